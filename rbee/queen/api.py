"""The queen's HTTP API, with the original system's paths and payloads.

    POST   /v1/hive-heartbeat        a HiveHeartbeat; replies {"status": "ok", "message": ...}
    GET    /v1/heartbeats/stream     SSE, event ``heartbeat``, data: a StreamEvent, id: its place
                                     in the stream (``Last-Event-ID`` resumes after it)
    GET    /health                   503 with status ``degraded`` while the store is unreachable
    GET    /v1/hives                 every hive (HiveState), stale ones flagged; paged like
                                     /v1/workers (?limit=, registry.hives_limit; ?after=<hive id>)
    GET    /v1/hives/{hive_id}
    DELETE /v1/hives/{hive_id}       an operator's removal, announced like a stale one
    GET    /v1/workers               every worker; with ?idle=true, ?model=M, ?min_free_vram_mb=N,
                                     ?max_waiting=N, ?max_kv_cache_pct=P only schedulable
                                     workers matching all of them. Paged: at most ?limit=N
                                     (registry.workers_limit by default) in worker id order; a
                                     full page carries X-Next-After (and a Link rel="next"), to
                                     pass back as ?after=<worker id> for the next page
    GET    /v1/history               aligned columns of past figures (rbee/queen/history.py)
    GET    /metrics                  the fleet and the queen, for Prometheus (rbee/exposition.py)
    GET    /                         the live fleet dashboard; /static/... its files (dashboard.py)

With ``auth_token_file`` set, the two writes (heartbeat, DELETE) take ``Authorization: Bearer
<token>`` (401 without it). With ``hive_credentials_file`` set, a hive may instead send its own
credential (``Authorization: Basic base64(hive_id:secret)``) and then acts only as itself: a
heartbeat or goodbye for another hive id, or a DELETE of another hive, is refused (403). With
``read_token_file`` set, the stream, the listings, the history and ``/metrics`` take the read
token (or the shared one); ``/health`` stays open. See ``rbee/auth.py``.

Every error is JSON ``{"status": "error", "message": ...}`` with a 4xx/5xx code, and a request that
fails validation leaves the registry untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.lowlevel
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from .._errors import AdmissionError, NotFoundError, StoreError
from ..contract import OperationalStatus, QueenHealth, decode_heartbeat, encode, paths
from ..exposition import metrics_route
from ..http.app import JsonResponse, json_app, ok
from ..http.auth import ANY_HIVE, authenticate_hive, require_reader
from ..http.bodies import read_body
from ..http.errors import ApiError
from .dashboard import dashboard_routes
from .history import METRICS, QueryError, Selector
from .registry import HiveRegistry, WorkerQuery

T = TypeVar("T")

HISTORY_PARAMS = frozenset({"hive", "group", "instance", "gpu", "metric", "since", "step"})

if TYPE_CHECKING:
    from .server import QueenServer


class EventStreamResponse(EventSourceResponse):
    """sse-starlette's response with the last send (``more_body: False``) shielded.

    When a stream ends, sse-starlette's disconnect listener cancels its task group while that last
    send is still inside hypercorn; under the trio worker this cancels hypercorn's setup of the
    connection's idle task, and the kept-alive connection is then closed by nobody: shutdown
    waits out the whole grace period. Shielding the final send lets hypercorn finish the cycle."""

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_shielded_end(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with anyio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await super().__call__(scope, receive, send_with_shielded_end)


WORKER_FILTERS = ("idle", "model", "min_free_vram_mb", "max_waiting", "max_kv_cache_pct")
WORKER_PARAMS = (*WORKER_FILTERS, "limit", "after")
NEXT_AFTER_HEADER = "X-Next-After"


def _bool_param(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"query parameter {name!r} must be true or false, not {value!r}")


def _float_param(request: Request, name: str) -> float | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be a number, not {value!r}") from None
    if not number >= 0:  # also refuses nan
        raise ApiError(400, f"query parameter {name!r} must be >= 0, not {value!r}")
    if number == math.inf:  # a finite number only: infinity overflows what is computed from it
        raise ApiError(400, f"query parameter {name!r} must be a finite number, not {value!r}")
    return number


def _limit_param(request: Request, default: int, most: int, most_key: str) -> int:
    value = request.query_params.get("limit")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ApiError(400, f"query parameter 'limit' must be a whole number from 1 to "
                            f"{most} ({most_key}), not {value!r}")
    return int(value)


def _paged(request: Request, body: bytes, next_after: str | None) -> Response:
    """A page's JSON, with the cursor of the next one when there may be one."""
    headers = {}
    if next_after is not None:
        following = request.url.include_query_params(after=next_after)
        headers = {NEXT_AFTER_HEADER: next_after,
                   "Link": f'<{following.path}?{following.query}>; rel="next"'}
    return Response(body, media_type="application/json", headers=headers)


LISTING_SLICE = 100
"""Workers (or hives) listed and encoded between two checkpoints of a listing (about 1 ms)."""

Fetch = Callable[[str | None, int], tuple[Sequence[object], str | None]]
"""One slice of a listing: (after, at most n) -> (items, the next slice's cursor or None)."""


async def _listed_in_slices(fetch: Fetch, after: str | None, limit: int
                            ) -> tuple[bytes, str | None]:
    """A page of ``limit`` items as JSON, and the next page's cursor. It is listed and encoded
    ``LISTING_SLICE`` items at a time with a checkpoint between, following the registry's own
    cursor, so heartbeats are served between slices instead of waiting for the whole page (the
    page is then not one atomic view; each record is). Raises ValueError for a bad ``after``."""
    slices: list[bytes] = []
    count = 0
    while True:
        items, after = fetch(after, min(LISTING_SLICE, limit - count))
        if items:
            slices.append(encode(items)[1:-1])  # the items, without the brackets
        count += len(items)
        if after is None or count >= limit:
            return b"[" + b",".join(slices) + b"]", after
        await anyio.lowlevel.checkpoint()


async def stored(write: Awaitable[T]) -> T:
    """A write to the store; 503 naming the problem when the store cannot take it (the hive
    retries, possibly at another queen)."""
    try:
        return await write
    except StoreError as exc:
        raise ApiError(503, f"the registry store is unavailable: {exc}") from exc


def _workers(registry: HiveRegistry, query: WorkerQuery) -> Fetch:
    def fetch(after: str | None, limit: int) -> tuple[Sequence[object], str | None]:
        page = registry.workers_page(query, after=after, limit=limit)
        return page.workers, page.next_after

    return fetch


def build_app(queen: QueenServer) -> Starlette:
    registry, broadcaster, config, store = (queen.registry, queen.broadcaster, queen.config,
                                            queen.store)
    one_listing_at_a_time = anyio.Lock()
    """Listings take turns: readers looping on ``/v1/workers`` get one slice of the event loop
    between heartbeats, not one each."""

    metrics = queen.metrics

    async def post_heartbeat(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await ingest(request)
        except ApiError as exc:
            metrics.refusal(exc.status_code)
            raise
        metrics.received.inc()
        metrics.ingest.observe(time.perf_counter() - started)
        return response

    async def ingest(request: Request) -> Response:
        acting_as = authenticate_hive(request, queen.token, queen.credentials)
        body = await read_body(request, config.http.max_body_bytes)
        heartbeat = decode_heartbeat(body)  # a ContractError answers 400, naming the field
        if acting_as is not ANY_HIVE and heartbeat.hive.id != acting_as:
            raise ApiError(403, f"the credential of hive {acting_as!r} cannot post as hive "
                                f"{heartbeat.hive.id!r}")
        if len(heartbeat.workers) > config.registry.max_workers_per_hive:
            raise ApiError(400, f"invalid heartbeat: {len(heartbeat.workers)} workers, more than "
                                f"registry.max_workers_per_hive "
                                f"({config.registry.max_workers_per_hive}) - at `$.workers`")
        if heartbeat.hive.operational_status is OperationalStatus.STOPPED:
            # a hive's goodbye: its workers are no longer watched by anyone
            await stored(store.remove(heartbeat.hive.id, "the hive stopped"))
            return ok(f"hive {heartbeat.hive.id!r} stopped: removed")
        try:
            await stored(store.ingest(heartbeat, len(body)))
        except AdmissionError as exc:
            if exc.retry_after_s is None:
                raise ApiError(503, str(exc)) from exc
            raise ApiError(429, str(exc), headers={
                "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from exc
        return ok(f"heartbeat from hive {heartbeat.hive.id!r} with "
                  f"{len(heartbeat.workers)} workers received")

    def reader(request: Request) -> None:
        require_reader(request, queen.read_token, queen.token)

    async def stream(request: Request) -> Response:
        require_reader(request, queen.read_token, queen.token, query_parameter=True)
        if broadcaster.closed:
            raise ApiError(503, "the queen is shutting down")
        if broadcaster.full:
            raise ApiError(503, f"too many stream clients (stream.max_clients: "
                                f"{broadcaster.max_clients})")
        return EventStreamResponse(
            broadcaster.stream(request.headers.get("last-event-id")), ping=config.stream.keepalive_s,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def health(request: Request) -> Response:
        problem = store.problem
        return JsonResponse(QueenHealth(status="degraded" if problem else "ok",
                                        version=__version__, hives=len(registry),
                                        stream_clients=broadcaster.client_count,
                                        store=config.registry.store.kind, problem=problem,
                                        sweeping=(store.sweeping if config.registry.store.kind
                                                  == "redis" else None)),
                            status_code=503 if problem else 200)

    async def list_hives(request: Request) -> Response:
        reader(request)
        unknown = set(request.query_params) - {"limit", "after"}
        if unknown:
            raise ApiError(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                                f"known: limit, after")
        limit = _limit_param(request, config.registry.hives_limit, config.registry.max_hives,
                             "registry.max_hives")
        async with one_listing_at_a_time:
            body, next_after = await _listed_in_slices(
                lambda after, n: registry.hives_page(after=after, limit=n),
                request.query_params.get("after"), limit)
        return _paged(request, body, next_after)

    async def get_hive(request: Request) -> Response:
        reader(request)
        try:
            return JsonResponse(registry.get_hive(request.path_params["hive_id"]))
        except NotFoundError as exc:
            raise ApiError(404, str(exc)) from exc

    async def delete_hive(request: Request) -> Response:
        acting_as = authenticate_hive(request, queen.token, queen.credentials)
        hive_id = request.path_params["hive_id"]
        if acting_as is not ANY_HIVE and hive_id != acting_as:
            raise ApiError(403, f"the credential of hive {acting_as!r} cannot remove hive "
                                f"{hive_id!r} (only itself; the shared token can)")
        event = await stored(store.remove(hive_id, "removed by request"))
        if event is None:
            raise ApiError(404, f"unknown hive {hive_id!r}")
        return ok(f"hive {hive_id!r} and {len(event.worker_ids)} workers removed")

    async def list_workers(request: Request) -> Response:
        reader(request)
        unknown = set(request.query_params) - set(WORKER_PARAMS)
        if unknown:
            raise ApiError(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(WORKER_PARAMS)}")
        idle = _bool_param(request, "idle")
        model = request.query_params.get("model")
        min_free = _float_param(request, "min_free_vram_mb")
        max_waiting = _float_param(request, "max_waiting")
        if max_waiting is not None and not max_waiting.is_integer():
            raise ApiError(400, f"query parameter 'max_waiting' must be a whole number, "
                                f"not {request.query_params['max_waiting']!r}")
        max_kv = _float_param(request, "max_kv_cache_pct")
        query = WorkerQuery(idle=idle, model=model, min_free_vram_mb=min_free,
                            max_kv_cache_pct=max_kv,
                            max_waiting=None if max_waiting is None else int(max_waiting))
        limit = _limit_param(request, config.registry.workers_limit,
                             config.registry.workers_max_limit, "registry.workers_max_limit")
        try:
            async with one_listing_at_a_time:
                body, next_after = await _listed_in_slices(
                    _workers(registry, query), request.query_params.get("after"), limit)
        except ValueError as exc:
            raise ApiError(400, f"query parameter 'after': {exc}") from exc
        return _paged(request, body, next_after)

    async def history(request: Request) -> Response:
        reader(request)
        params = request.query_params
        unknown = set(params) - HISTORY_PARAMS
        if unknown:
            raise ApiError(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(HISTORY_PARAMS))}")
        metrics = None
        if "metric" in params:
            metrics = frozenset(m.strip() for m in params["metric"].split(",") if m.strip())
            bad = metrics - METRICS
            if bad or not metrics:
                raise ApiError(400, f"unknown metric(s): {', '.join(sorted(bad)) or '(none)'}; "
                                    f"known: {', '.join(sorted(METRICS))}")
        since = _float_param(request, "since")
        step = _float_param(request, "step")
        if step is not None and step == 0:
            raise ApiError(400, "query parameter 'step' must be > 0, not '0'")
        selector = Selector(hive=params.get("hive"), group=params.get("group"),
                            instance=params.get("instance"), gpu=params.get("gpu"),
                            metrics=metrics)
        try:
            answer = queen.history.query(selector, 60.0 if since is None else since, step,
                                         time.time())
        except QueryError as exc:
            raise ApiError(400, str(exc)) from exc
        return JsonResponse(answer)

    return json_app([
        Route(paths.HEARTBEAT, post_heartbeat, methods=["POST"]),
        Route(paths.STREAM, stream, methods=["GET"]),
        Route(paths.HEALTH, health, methods=["GET"]),
        Route(paths.HIVES, list_hives, methods=["GET"]),
        Route(paths.HIVE, get_hive, methods=["GET"]),
        Route(paths.HIVE, delete_hive, methods=["DELETE"]),
        Route(paths.WORKERS, list_workers, methods=["GET"]),
        Route(paths.HISTORY, history, methods=["GET"]),
        metrics_route(metrics.registry, metrics.records, reader),
        *dashboard_routes(),
    ], config.http)
