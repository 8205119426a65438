"""``rbee``: the command line of rbee telemetry.

    rbee up        all in one on this machine: a queen, a local hive, demo workers, live view
                   (and the queen's browser dashboard, whose URL it prints)
    rbee top       a live view of the fleet, from the queen's stream: interactive on a terminal
                   (keys in docs/top.md), text with --plain or --rounds N; [--columns K,...]
    rbee workers   the scheduling queries: [--idle] [--model M] [--min-free-vram MB]
                   [--max-waiting N] [--max-kv-cache-pct P] [--limit N] [--after ID] [--json]
                   [--columns K,...]

``--queen URL`` (or ``RBEE_QUEEN``) names the queen; the default is the local one. For an
``https://`` queen, ``--ca-file`` (or ``RBEE_CA_FILE``) names the CA bundle to verify it against.
``--read-token-file FILE`` (or ``RBEE_READ_TOKEN_FILE``) holds the queen's read token, if it asks
for one.

    rbee credential new HIVE_ID [--secret-file FILE]
                   a hive's own credential: the secret (printed once, or written to FILE) and
                   the line for the queen's ``hive_credentials_file``
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import httpx
import msgspec
import trio

from ._errors import ContractError, ListenError, RbeeError, leaf_exceptions
from .columns import parse_keys, with_metrics
from .contract import FleetWorker, decode_json, paths, reply_message
from .credentials import new_credential
from .demo import DEMO_HIVE_PORT
from .fleetview import TREND_METRICS, trends_of
from .http.auth import bearer, read_token
from .http.tls import client_verify
from .terminal import WORKER_COLUMNS, Row, count, printable, table
from .top import watch

DEFAULT_QUEEN = "http://127.0.0.1:7833"
_fleet_decoder = msgspec.json.Decoder(list[FleetWorker])


async def top(args: argparse.Namespace) -> None:
    await watch(args.queen, args.rounds, verify=client_verify(args.ca_file, "--ca-file"),
                headers=args.read_headers, metrics=parse_keys(args.columns))


def interactive(args: argparse.Namespace) -> bool:
    """The interactive view: on a terminal, unless ``--plain`` or ``--rounds`` asks for text."""
    return (args.command == "top" and not args.plain and not args.rounds
            and sys.stdin.isatty() and sys.stdout.isatty())


def run_app(args: argparse.Namespace) -> int:
    from .top.app import TopApp  # textual loads only for the interactive view

    app = TopApp(args.queen, verify=client_verify(args.ca_file, "--ca-file"),
                 headers=args.read_headers, metrics=parse_keys(args.columns))
    app.run()
    return app.return_code or 0


def reader_headers(path: str | None) -> dict[str, str]:
    """The header carrying the read token in ``path`` (none without one)."""
    return bearer(read_token(path or None, key="--read-token-file"))


def credential(args: argparse.Namespace) -> int:
    try:
        secret, line = new_credential(args.hive_id)
    except ValueError as exc:
        print(f"rbee: {exc}", file=sys.stderr)
        return 1
    if args.secret_file is not None:
        try:
            fd = os.open(args.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(f"rbee: cannot create {args.secret_file}: {exc.strerror}", file=sys.stderr)
            return 1
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        print(f"# secret of hive {args.hive_id!r} written to {args.secret_file} "
              f"(the hive's credential_file); line for the queen's hive_credentials_file:",
              file=sys.stderr)
    else:
        print(f"# secret of hive {args.hive_id!r}, shown only this once: put it in the hive's "
              f"credential_file\n{secret}\n# line for the queen's hive_credentials_file:",
              file=sys.stderr)
    print(line)
    return 0


def workers(args: argparse.Namespace) -> int:
    params: dict[str, str] = {}
    if args.idle:
        params["idle"] = "true"
    if args.model is not None:
        params["model"] = args.model
    if args.min_free_vram is not None:
        params["min_free_vram_mb"] = str(args.min_free_vram)
    if args.max_waiting is not None:
        params["max_waiting"] = str(args.max_waiting)
    if args.max_kv_cache_pct is not None:
        params["max_kv_cache_pct"] = str(args.max_kv_cache_pct)
    if args.limit is not None:
        params["limit"] = str(args.limit)
    if args.after is not None:
        params["after"] = args.after
    try:
        response = httpx.get(f"{args.queen}{paths.WORKERS}", params=params, timeout=args.timeout,
                             verify=client_verify(args.ca_file, "--ca-file"),
                             headers=args.read_headers)
    except httpx.TransportError as exc:
        print(f"rbee: cannot reach the queen at {args.queen}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        problem = (reply_message(response.content)
                   or f"HTTP {response.status_code}: {response.text[:200]}")
        print(f"rbee: {printable(problem)}", file=sys.stderr)
        return 1
    if args.json:
        print(response.text)
        return 0
    try:
        found = decode_json(_fleet_decoder, response.content, "list of workers")
    except ContractError as exc:
        print(f"rbee: the queen's reply is an {exc}", file=sys.stderr)
        return 1
    trends = last_minute(args, found)
    columns = with_metrics(WORKER_COLUMNS, parse_keys(args.columns))
    if trends is None:  # no history to fill LAST 60s with: no column, rather than a blank one
        columns = tuple(c for c in columns if c.title != "LAST 60s")
    trends = trends or {}
    print(table((Row(w.hive_id, w.worker, w.idle, _workers_note(w),
                     trends.get((w.hive_id, w.worker.group, w.worker.instance), ""), w.hive_stale)
                 for w in found), terminal_width(), columns))
    print(count(len(found), "worker"))
    if following := response.headers.get("x-next-after"):
        print(f"more: rbee workers --after {following} (with the same filters)")
    return 0


def terminal_width() -> int | None:
    """On a terminal, its width (the table fits it, as ``rbee top``'s); into a pipe, None (every
    column, whole, for scripts)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def last_minute(args: argparse.Namespace, found: list[FleetWorker]
                ) -> dict[tuple[str, str, str], str] | None:
    """The LAST 60s column: one ``/v1/history`` request (one hive's series when every worker
    found is on it); None when the queen keeps no history or does not answer."""
    if not found:
        return {}
    params = {"metric": TREND_METRICS, "since": "60", "step": "5"}
    if len(hives := {w.hive_id for w in found}) == 1:
        params["hive"] = hives.pop()
    try:
        response = httpx.get(f"{args.queen}{paths.HISTORY}", params=params, timeout=args.timeout,
                             verify=client_verify(args.ca_file, "--ca-file"),
                             headers=args.read_headers)
        return trends_of(response.json()) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _workers_note(found: FleetWorker) -> str:
    notes = ["STALE"] if found.hive_stale else []
    if found.vram is not None:
        notes.append(f"VRAM free {found.vram.free_mb:.0f} MiB, rbee {found.vram.claimed_mb:.0f}")
    return ", ".join(notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee", description="rbee telemetry")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    queen_option = argparse.ArgumentParser(add_help=False)
    queen_option.add_argument("--queen", default=os.environ.get("RBEE_QUEEN", DEFAULT_QUEEN),
                              help=f"the queen's URL (default: $RBEE_QUEEN or {DEFAULT_QUEEN})")
    queen_option.add_argument("--ca-file", default=os.environ.get("RBEE_CA_FILE"),
                              help="CA bundle (PEM) to verify an https:// queen against "
                                   "(default: $RBEE_CA_FILE, else the system's CAs)")
    queen_option.add_argument("--read-token-file", metavar="FILE",
                              default=os.environ.get("RBEE_READ_TOKEN_FILE"),
                              help="a file holding the queen's read token, if it asks for one "
                                   "(default: $RBEE_READ_TOKEN_FILE)")
    run_up = commands.add_parser("up", help="queen, local hive and demo workers, live view")
    run_up.add_argument("--port", type=int, default=7833,
                        help="the queen's port (0: any free, for the hive's API too)")
    run_up.add_argument("--hive-port", type=int, metavar="PORT",
                        help=f"the demo hive's API port (default {DEMO_HIVE_PORT}, or any free "
                             "one with --port 0)")
    run_up.add_argument("--rounds", type=int, default=0, help="stop after N updates (0: never)")
    run_top = commands.add_parser("top", parents=[queen_option], help="live view of the fleet")
    run_top.add_argument("--rounds", type=int, default=0,
                         help="print the fleet as text N times, then stop (0: never)")
    run_top.add_argument("--plain", action="store_true",
                         help="print the fleet as text whenever it changes (no keys)")
    columns_help = ("plugin figures to show as columns: keys of a worker's metrics, "
                    "comma-separated (e.g. ctxsw.procs,ctxsw.switches_s)")
    run_top.add_argument("--columns", metavar="K,...", help=columns_help)
    run_workers = commands.add_parser("workers", parents=[queen_option],
                                      help="scheduling queries: workers matching all filters")
    run_workers.add_argument("--idle", action="store_true",
                             help="no request in its engine (engine known), else GPU at or "
                                  "under the threshold")
    run_workers.add_argument("--model", help="serving this model")
    run_workers.add_argument("--min-free-vram", type=float, metavar="MB",
                             help="at least this much free VRAM (MiB) on the worker's GPUs")
    run_workers.add_argument("--max-waiting", type=int, metavar="N",
                             help="at most N requests waiting in its engine")
    run_workers.add_argument("--max-kv-cache-pct", type=float, metavar="P",
                             help="its engine's KV cache at most P %% full")
    run_workers.add_argument("--limit", type=int, metavar="N",
                             help="at most N workers (the queen's registry.workers_limit if not "
                                  "given); a full page prints how to ask for the next")
    run_workers.add_argument("--after", metavar="ID",
                             help="the page after this worker id (hive/group/instance)")
    run_workers.add_argument("--json", action="store_true", help="the queen's JSON as it is")
    run_workers.add_argument("--columns", metavar="K,...", help=columns_help)
    run_workers.add_argument("--timeout", type=float, default=5.0, help="seconds")
    run_credential = commands.add_parser("credential", help="per-hive credentials")
    credential_commands = run_credential.add_subparsers(dest="action", required=True)
    run_new = credential_commands.add_parser(
        "new", help="a new secret for a hive and its line for the queen's hive_credentials_file")
    run_new.add_argument("hive_id", metavar="HIVE_ID")
    run_new.add_argument("--secret-file", metavar="FILE",
                         help="write the secret to this new file (mode 0600) instead of "
                              "printing it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "credential":
        return credential(args)
    if args.command in ("workers", "top"):
        try:
            args.read_headers = reader_headers(args.read_token_file)
            parse_keys(args.columns)
        except (RbeeError, ValueError) as exc:
            print(f"rbee: {exc}", file=sys.stderr)
            return 1
    if args.command == "workers":
        try:
            return workers(args)
        except RbeeError as exc:
            print(f"rbee: {exc}", file=sys.stderr)
            return 1
    status = 0
    if interactive(args):
        try:
            return run_app(args)
        except RbeeError as exc:
            print(f"rbee: {exc}", file=sys.stderr)
            return 1
    if args.command == "up":
        from .demo.up import up  # the demo alone starts a queen and a hive in this process
    try:
        trio.run(up if args.command == "up" else top, args)
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        print("rbee: stopped", file=sys.stderr)
    except* (RbeeError, OSError) as group:
        for exc in leaf_exceptions(group):
            print(f"rbee: {exc}", file=sys.stderr)
            if args.command == "up" and isinstance(exc, ListenError):
                print("rbee: the demo needs two ports, the queen's (--port) and its hive's "
                      "(--hive-port); `rbee up --port 0` picks free ones for both",
                      file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
