"""``rbee pick``: the queen's best workers of a model for the next request (``GET /v1/pick``),
as a table or the queen's JSON; and the filters it shares with ``rbee workers``."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

import httpx
import msgspec

from ._errors import ContractError
from .contract import PickAnswer, PickedWorker, decode_json, paths, reply_message
from .http.tls import client_verify
from .terminal import printable

T = TypeVar("T")
_answer_decoder = msgspec.json.Decoder(PickAnswer)
HEADER = ("WORKER", "ENDPOINT", "SCORE", "RUN", "WAIT", "KV%", "IN-FLIGHT", "ENGINE-AGE",
          "HB-AGE", "")


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The scheduling filters of ``/v1/workers`` and ``/v1/pick`` as options."""
    parser.add_argument("--idle", action="store_true",
                        help="no request in its engine (engine known), else GPU at or under "
                             "the threshold")
    parser.add_argument("--min-free-vram", type=float, metavar="MB",
                        help="at least this much free VRAM (MiB) on the worker's GPUs")
    parser.add_argument("--max-waiting", type=int, metavar="N",
                        help="at most N requests waiting in its engine")
    parser.add_argument("--max-kv-cache-pct", type=float, metavar="P",
                        help="its engine's KV cache at most P %% full")


def filter_params(args: argparse.Namespace) -> dict[str, str]:
    """The query parameters of the options ``add_filters`` made (and ``--model``)."""
    given = {"idle": "true" if args.idle else None, "model": args.model,
             "min_free_vram_mb": args.min_free_vram, "max_waiting": args.max_waiting,
             "max_kv_cache_pct": args.max_kv_cache_pct}
    return {name: str(value) for name, value in given.items() if value is not None}


def ask_queen(args: argparse.Namespace, path: str, params: dict[str, str],
              decoder: msgspec.json.Decoder[T], what: str) -> int | tuple[httpx.Response, T]:
    """The queen's 200 answer to a GET and its decoded value; or the exit status once done: 1
    with the problem printed, 0 with ``--json`` (the answer printed as it is)."""
    try:
        response = httpx.get(f"{args.queen}{path}", params=params, timeout=args.timeout,
                             verify=client_verify(args.ca_file, "--ca-file"),
                             headers=args.read_headers)
    except httpx.TransportError as exc:
        print(f"rbee: cannot reach the queen at {args.queen}: {exc}", file=sys.stderr)
        return None
    if response.status_code != 200:
        problem = (reply_message(response.content)
                   or f"HTTP {response.status_code}: {response.text[:200]}")
        print(f"rbee: {printable(problem)}", file=sys.stderr)
        return 1
    if args.json:
        print(response.text)
        return 0
    try:
        return response, decode_json(decoder, response.content, what)
    except ContractError as exc:
        print(f"rbee: the queen's reply is an {exc}", file=sys.stderr)
        return 1


def pick(args: argparse.Namespace) -> int:
    asked = ask_queen(args, paths.PICK, {**filter_params(args), "n": str(args.n)},
                      _answer_decoder, "pick answer")
    if isinstance(asked, int):
        return asked
    print(render(asked[1]))
    return 0


def render(answer: PickAnswer) -> str:
    """The picked workers as aligned columns, best first, and what the queen left out."""
    rows = [HEADER, *(_row(worker) for worker in answer.picked)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in rows]
    notes = [f"{answer.candidates} candidates of {printable(answer.model)}"]
    if answer.skipped_stale:
        notes.append(f"{answer.skipped_stale} skipped as stale")
    if answer.all_stale:
        notes.append("every candidate is stale: the best are offered anyway "
                     "(pick.all_stale: fail_open)")
    return "\n".join([*lines, "; ".join(notes)])


def _row(worker: PickedWorker) -> tuple[str, ...]:
    def figure(value: float | None, form: str = "{}") -> str:
        return "-" if value is None else form.format(value)

    return (printable(f"{worker.hive_id}/{worker.group}/{worker.instance}"),
            printable(worker.endpoint), f"{worker.score:.2f}", figure(worker.requests_running),
            figure(worker.requests_waiting), figure(worker.kv_cache_pct, "{:.1f}"),
            str(worker.in_flight), figure(worker.engine_age_ms, "{:.0f}ms"),
            f"{worker.heartbeat_age_ms:.0f}ms", "STALE" if worker.stale else "")
