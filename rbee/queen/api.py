"""The queen's HTTP API, with the original system's paths and payloads.

    POST   /v1/hive-heartbeat        a HiveHeartbeat; replies {"status": "ok", "message": ...}
    GET    /v1/heartbeats/stream     SSE, event ``heartbeat``, data: a StreamEvent, id: its place
                                     in the stream (``Last-Event-ID`` resumes after it);
                                     ?hive=, ?model=, ?events= choose what a client hears
                                     (rbee/queen/streamfilter.py)
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
    GET    /v1/pick                  ?model=M&n=K: the K best workers of M (rbee/queen/pick)
    GET    /metrics                  the fleet and the queen, for Prometheus (rbee/scrape.py)
    GET    /                         the live fleet dashboard; /static/... its files (dashboard.py)

With ``auth_token_file`` set, the two writes (heartbeat, DELETE) take ``Authorization: Bearer
<token>`` (401 without it). With ``hive_credentials_file`` set, a hive may instead send its own
credential (``Authorization: Basic base64(hive_id:secret)``) and then acts only as itself: a
heartbeat or goodbye for another hive id, or a DELETE of another hive, is refused (403). With
``read_token_file`` set, the stream, the listings, the history and ``/metrics`` take the read
token (or the shared one); ``/health`` stays open. See ``rbee/http/auth.py``.

Every error is JSON ``{"status": "error", "message": ...}`` with a 4xx/5xx code, and a request that
fails validation leaves the registry untouched. The paths are named in ``rbee/contract/paths.py``;
errors answer by type (``STATUSES``); query parameters are decoded into structs
(``rbee/queen/queries.py``). The handlers need only small views of the queen (``Access``,
``Gate``), not the queen itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import anyio
import anyio.lowlevel
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from .._errors import NotFoundError, StoreError
from ..config import QueenConfig
from ..contract import QueenHealth, Reply, decode_heartbeat, encode, paths
from ..credentials import HiveCredentials
from ..http.app import JsonResponse, Statuses, json_app, ok
from ..http.auth import ANY_HIVE, authenticate_hive, require_reader
from ..http.bodies import read_body
from ..http.errors import ApiError
from ..http.rawpost import RawHead
from ..http.rawstream import StreamHead
from ..scrape import metrics_route
from .channel import ChannelService, OpenChannels
from .channelhub import ChannelHub
from .dashboard import dashboard_routes
from .fleet import Fleet
from .history import FleetHistory, QueryError, Selector
from .ingest import Ingest, stored
from .metrics import QueenMetrics
from .pick import pick_handler
from .queries import HistoryQuery, HivesQuery, WorkersQuery, decode_query, whole
from .registry import HiveRegistry
from .scheduling import WorkerQuery
from .streamfilter import parse_stream_filter

NEXT_AFTER_HEADER = "X-Next-After"

STATUSES: Statuses = {
    NotFoundError: 404,
    QueryError: 400,
    StoreError: 503,
}
"""What the queen answers for each of its errors a handler lets through (a heartbeat refused by
admission answers 429 or 503 by its ``retry_after_s``: ``IngestHandlers``)."""


class Access(Protocol):
    """Who may write and read: the queen's tokens and hive credentials (``rbee/http/auth.py``)."""

    token: str | None
    read_token: str | None
    credentials: HiveCredentials | None


class Gate:
    """The checks every endpoint makes of its caller."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def hive(self, request: Request) -> str | None:
        """The hive a write may act as, or ``ANY_HIVE``."""
        return authenticate_hive(request, self.access.token, self.access.credentials)

    def reader(self, request: Request) -> None:
        require_reader(request, self.access.read_token, self.access.token)

    def stream_reader(self, request: Request) -> None:
        require_reader(request, self.access.read_token, self.access.token, query_parameter=True)


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


class IngestHandlers:
    """The writes: heartbeats (and a hive's goodbye), and an operator's removal."""

    def __init__(self, config: QueenConfig, fleet: Fleet, gate: Gate,
                 metrics: QueenMetrics) -> None:
        self.config, self.store, self.gate, self.metrics = config, fleet.store, gate, metrics
        self.ingest = Ingest(config, fleet.store)

    async def post_heartbeat(self, request: Request) -> Response:
        """The heartbeat through Starlette: what a connection hands the app (its raw route,
        ``admit`` and ``answer``, takes the rest)."""
        try:
            acting_as = self.gate.hive(request)
            body = await read_body(request, self.config.http.max_body_bytes)
        except ApiError as exc:
            self.metrics.refusal(exc.status_code)
            raise
        return Response(await self.answer(request, acting_as, body),
                        media_type=JsonResponse.media_type)

    def admit(self, head: RawHead) -> str | None:
        """The heartbeat's caller, from its head (``RawPost``): a refusal goes to the app."""
        return self.gate.hive(head)

    async def answer(self, head: RawHead | Request, acting_as: str | None, body: bytes) -> bytes:
        """Decode and accept a heartbeat's whole body; the 200's JSON (``RawPost``)."""
        started = time.perf_counter()
        try:
            heartbeat = decode_heartbeat(body)  # a ContractError answers 400, naming the field
            message = await self.ingest.accept(heartbeat, len(body), acting_as)
        except ApiError as exc:
            self.metrics.refusal(exc.status_code)
            raise
        self.metrics.received.inc()
        self.metrics.ingest.observe(time.perf_counter() - started)
        return encode(Reply(status="ok", message=message))

    async def delete_hive(self, request: Request) -> Response:
        acting_as = self.gate.hive(request)
        hive_id = request.path_params["hive_id"]
        if acting_as is not ANY_HIVE and hive_id != acting_as:
            raise ApiError(403, f"the credential of hive {acting_as!r} cannot remove hive "
                                f"{hive_id!r} (only itself; the shared token can)")
        event = await stored(self.store.remove(hive_id, "removed by request"))
        if event is None:
            raise ApiError(404, f"unknown hive {hive_id!r}")
        return ok(f"hive {hive_id!r} and {len(event.worker_ids)} workers removed")


class StreamHandlers:
    """The live stream and the queen's health."""

    def __init__(self, config: QueenConfig, fleet: Fleet, gate: Gate) -> None:
        self.config, self.fleet, self.gate = config, fleet, gate

    @property
    def keepalive_s(self) -> float:
        return self.config.stream.keepalive_s

    def open(self, request: Request | StreamHead) -> AsyncIterator[bytes]:
        """A client's stream, after the checks every stream request gets (``ApiError``)."""
        self.gate.stream_reader(request)
        stream_filter = parse_stream_filter(request.query_params)
        broadcaster = self.fleet.broadcaster
        if broadcaster.closed:
            raise ApiError(503, "the queen is shutting down")
        if broadcaster.full:
            raise ApiError(503, f"too many stream clients (stream.max_clients: "
                                f"{broadcaster.max_clients})")
        return self.fleet.stream(request.headers.get("last-event-id"), stream_filter,
                                 getattr(request, "direct", None))

    async def stream(self, request: Request) -> Response:
        """The stream through Starlette (HTTP/2, or a request the connection left to the app:
        ``rbee/http/rawstream.py`` serves the rest)."""
        return EventStreamResponse(
            self.open(request), ping=self.config.stream.keepalive_s,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def health(self, request: Request) -> Response:
        store = self.fleet.store.health()
        return JsonResponse(QueenHealth(status="degraded" if store.problem else "ok",
                                        version=__version__, hives=len(self.fleet.registry),
                                        stream_clients=self.fleet.broadcaster.client_count,
                                        store=store.kind, problem=store.problem,
                                        sweeping=store.sweeping),
                            status_code=503 if store.problem else 200)


class ReadHandlers:
    """The listings, one hive, and the history."""

    def __init__(self, config: QueenConfig, registry: HiveRegistry, history: FleetHistory,
                 gate: Gate) -> None:
        self.settings, self.registry, self.history, self.gate = (config.registry, registry,
                                                                 history, gate)
        self.one_listing_at_a_time = anyio.Lock()
        """Listings take turns: readers looping on ``/v1/workers`` get one slice of the event
        loop between heartbeats, not one each."""

    def _limit(self, value: str | None, default: int, most: int, most_key: str) -> int:
        if value is None:
            return default
        if not value.isdigit() or not 1 <= int(value) <= most:
            raise ApiError(400, f"query parameter 'limit' must be a whole number from 1 to "
                                f"{most} ({most_key}), not {value!r}")
        return int(value)

    async def list_hives(self, request: Request) -> Response:
        self.gate.reader(request)
        query = decode_query(request.query_params, HivesQuery)
        settings = self.settings
        limit = self._limit(query.limit, settings.hives_limit, settings.max_hives,
                            "registry.max_hives")
        async with self.one_listing_at_a_time:
            body, next_after = await _listed_in_slices(
                lambda after, n: self.registry.hives_page(after=after, limit=n), query.after,
                limit)
        return _paged(request, body, next_after)

    async def get_hive(self, request: Request) -> Response:
        self.gate.reader(request)
        return JsonResponse(self.registry.get_hive(request.path_params["hive_id"]))

    async def list_workers(self, request: Request) -> Response:
        self.gate.reader(request)
        params = decode_query(request.query_params, WorkersQuery)
        query = WorkerQuery(idle=params.idle, model=params.model,
                            min_free_vram_mb=params.min_free_vram_mb,
                            max_kv_cache_pct=params.max_kv_cache_pct,
                            max_waiting=whole("max_waiting", params.max_waiting,
                                              request.query_params.get("max_waiting")))
        settings = self.settings
        limit = self._limit(params.limit, settings.workers_limit, settings.workers_max_limit,
                            "registry.workers_max_limit")
        registry = self.registry

        def fetch(after: str | None, n: int) -> tuple[Sequence[object], str | None]:
            page = registry.workers_page(query, after=after, limit=n)
            return page.workers, page.next_after

        try:
            async with self.one_listing_at_a_time:
                body, next_after = await _listed_in_slices(fetch, params.after, limit)
        except ValueError as exc:
            raise ApiError(400, f"query parameter 'after': {exc}") from exc
        return _paged(request, body, next_after)

    async def history_of(self, request: Request) -> Response:
        self.gate.reader(request)
        params = decode_query(request.query_params, HistoryQuery)
        metrics = None
        if params.metric is not None:
            metrics = frozenset(m.strip() for m in params.metric.split(",") if m.strip())
            known = self.history.metrics()  # the built-in ones and the plugin figures held
            bad = metrics - known
            if bad or not metrics:
                raise ApiError(400, f"unknown metric(s): {', '.join(sorted(bad)) or '(none)'}; "
                                    f"known: {', '.join(sorted(known))}")
        if params.step is not None and params.step == 0:
            raise ApiError(400, "query parameter 'step' must be > 0, not '0'")
        selector = Selector(hive=params.hive, group=params.group, instance=params.instance,
                            gpu=params.gpu, metrics=metrics)
        since = 60.0 if params.since is None else params.since
        return JsonResponse(self.history.query(selector, since, params.step, time.time()))


class QueenParts(Access, Protocol):
    """What the queen's app is built from (``rbee/queen/server.py``)."""

    config: QueenConfig
    fleet: Fleet
    history: FleetHistory
    metrics: QueenMetrics
    channels: OpenChannels
    hub: ChannelHub


def build_app(queen: QueenParts) -> Starlette:
    config, fleet, metrics = queen.config, queen.fleet, queen.metrics
    gate = Gate(queen)
    writes = IngestHandlers(config, fleet, gate, metrics)
    live = StreamHandlers(config, fleet, gate)
    reads = ReadHandlers(config, fleet.registry, queen.history, gate)
    picks = pick_handler(config, fleet.registry, gate.reader)
    channel = ChannelService(config, writes.ingest, gate.hive, metrics, queen.channels, queen.hub)
    app = json_app([
        Route(paths.HEARTBEAT, writes.post_heartbeat, methods=["POST"]),
        channel.route(),
        Route(paths.STREAM, live.stream, methods=["GET"]),
        Route(paths.HEALTH, live.health, methods=["GET"]),
        Route(paths.HIVES, reads.list_hives, methods=["GET"]),
        Route(paths.HIVE, reads.get_hive, methods=["GET"]),
        Route(paths.HIVE, writes.delete_hive, methods=["DELETE"]),
        Route(paths.WORKERS, reads.list_workers, methods=["GET"]),
        Route(paths.HISTORY, reads.history_of, methods=["GET"]),
        Route(paths.PICK, picks.pick, methods=["GET"]),
        metrics_route(metrics.registry, metrics.records, gate.reader, metrics.detail),
        *dashboard_routes(),
    ], config.http, STATUSES)
    app.state.raw_posts[paths.HEARTBEAT] = writes  # served by the connections themselves
    app.state.raw_streams = {paths.STREAM: live}
    app.state.raw_gets[paths.PICK] = picks
    app.state.raw_sockets = {paths.CHANNEL: channel}
    return app
