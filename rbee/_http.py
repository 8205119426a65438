"""What the queen's and the hive's HTTP servers share: JSON replies and errors, body limits, and
serving a Starlette app on hypercorn's trio worker.

Every error a client gets is JSON ``{"status": "error", "message": ...}``, Starlette's own (unknown
path, wrong method) included, so a program can always read why.
"""

from __future__ import annotations

import logging
import socket
import zlib
from collections.abc import Awaitable, Callable, Sequence

import anyio
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from ._errors import ContractError, ListenError
from ._logs import RateLimitedLog
from ._transport import ConnectionTable, fit_descriptors, serve_connections
from .config import HttpSettings
from .telemetry import decode_json, encode
from .tls import check_server_files


class Reply(msgspec.Struct, kw_only=True):
    status: str
    message: str


_reply_decoder = msgspec.json.Decoder(Reply)


def reply_message(content: bytes) -> str | None:
    """The message of a JSON reply (an error's reason), or None when the body is not one: what a
    client of ours shows when a server refuses it, whatever that server sent."""
    try:
        return decode_json(_reply_decoder, content, "reply").message
    except ContractError:
        return None


class ApiError(Exception):
    """Raised by a handler to answer with ``status_code`` and a JSON message."""

    def __init__(self, status_code: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return encode(content)


def ok(message: str, status_code: int = 200) -> JsonResponse:
    return JsonResponse(Reply(status="ok", message=message), status_code=status_code)


_BODY_READ = "rbee_body_read"


def _error_handler(client_errors: RateLimitedLog):
    def error(request: Request, exc: Exception) -> Response:
        """The JSON answer to a refused request, logged (rate-limited, quoted). A request whose
        body was not read to its end gets ``Connection: close``: the unread rest of the body
        would otherwise be taken for the client's next request on that connection."""
        headers = None
        if isinstance(exc, ApiError):
            status_code, message, headers = exc.status_code, exc.message, exc.headers
        elif isinstance(exc, ContractError):
            status_code, message = 400, str(exc)
        else:
            assert isinstance(exc, HTTPException)
            status_code = exc.status_code
            message = f"{request.method} {request.url.path}: {exc.detail.lower()}"
        if _has_body(request) and not request.scope.get(_BODY_READ, False):
            headers = {**(headers or {}), "connection": "close"}
        client = request.client
        client_errors.warning("%s %s %r: %d %r",
                              f"{client.host}:{client.port}" if client else "-",
                              request.method, request.url.path, status_code, message)
        return JsonResponse(Reply(status="error", message=message), status_code=status_code,
                            headers=headers)

    return error


def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours: the client still gets JSON (the traceback goes to the log, once, by the
    server that sees the exception re-raised)."""
    return JsonResponse(Reply(status="error", message=f"internal error ({type(exc).__name__}); "
                                                      f"the server's log has the details"),
                        status_code=500, headers={"connection": "close"})


def _has_body(request: Request) -> bool:
    headers = request.headers
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def json_app(routes: Sequence[BaseRoute], http: HttpSettings | None = None) -> Starlette:
    """A Starlette app whose every answer is JSON; refused requests are logged by
    ``rbee.http.clients``, at most 10 lines per 10 s per app. ``http`` gives ``read_body`` its
    shared budget and deadline (the defaults without it)."""
    error = _error_handler(RateLimitedLog(logging.getLogger("rbee.http.clients")))
    app = Starlette(routes=list(routes),
                    exception_handlers={ApiError: error, ContractError: error,
                                        HTTPException: error, Exception: _internal_error})
    http = http or HttpSettings()
    app.state.body_budget = BodyBudget(http.body_budget)
    app.state.body_timeout_s = http.body_timeout_s
    return app


class BodyBudget:
    """The bytes of request bodies being read at once, across connections: with each request's
    own limit, what bounds the memory unfinished uploads can take.

    Large bodies (over 1/64 of the budget) may hold only three quarters of it together: the last
    quarter is kept for small ones, so a few unfinished multi-megabyte uploads cannot lock out the
    hives' few-kilobyte heartbeats."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.small = limit // 64
        self.reserved = 0

    def take(self, size: int, body_size: int) -> None:
        """Reserve ``size`` more bytes for a body of ``body_size`` so far, or refuse (503)."""
        room = self.limit if body_size <= self.small else self.limit - self.limit // 4
        if self.reserved + size > room:
            raise ApiError(503, f"too many request bodies being read at once "
                                f"(http.max_body_bytes_in_flight: {self.limit} bytes); "
                                f"retry later", headers={"retry-after": "1"})
        self.reserved += size

    def give_back(self, size: int) -> None:
        self.reserved -= size


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length before reading, or while reading a chunked body), with 503 when it would take
    the server past its budget of bodies in flight (``BodyBudget``: a declared length is
    reserved whole before a byte is read), and with 408 if it is not in within
    ``http.body_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"invalid Content-Length header: {declared!r}")
        if int(declared) > limit:
            if int(declared) <= DRAIN_MAX_BYTES:
                await _discard(request)
            raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes ({limit})")
    budget: BodyBudget = request.app.state.body_budget
    reserved = int(declared) if declared is not None else 0
    budget.take(reserved, reserved)
    try:
        with anyio.move_on_after(request.app.state.body_timeout_s) as waited:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body exceeds max_body_bytes ({limit})")
                if size > reserved:  # chunked (or longer than declared: h11 refuses that)
                    budget.take(size - reserved, size)
                    reserved = size
                chunks.append(chunk)
        if waited.cancelled_caught:
            raise ApiError(408, f"body not received within http.body_timeout_s "
                                f"({request.app.state.body_timeout_s:g}s)")
        body = b"".join(chunks)
    finally:
        budget.give_back(reserved)
    request.scope[_BODY_READ] = True
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        return gunzip_limited(body, limit)
    if encoding != "identity":
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    return body


DRAIN_MAX_BYTES = 16 * 2**20
DRAIN_MAX_S = 2.0


async def _discard(request: Request) -> None:
    """Read and drop a refused body of at most ``DRAIN_MAX_BYTES`` (within ``DRAIN_MAX_S``)
    before answering. Many clients (httpx among them) read no answer before they have sent the
    whole body; closing on them mid-upload can leave their send blocked until it times out, so
    they would never see the 413. A larger or slower body is not waited for: the answer and the
    close come at once."""
    with anyio.move_on_after(DRAIN_MAX_S):
        async for _ in request.stream():
            pass


def gunzip_limited(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (413) one that would inflate past ``limit`` bytes before
    inflating it further: a small "zip bomb" costs the server nothing."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"invalid gzip body: {exc}") from exc
    if len(data) > limit or inflater.unconsumed_tail:
        raise ApiError(413, f"decompressed body exceeds max_body_bytes ({limit})")
    if not inflater.eof:
        raise ApiError(400, "invalid gzip body: truncated")
    return data


async def serve(app: Starlette, bind: str, port: int, settings: HttpSettings, *,
                shutdown_trigger: Callable[[], Awaitable[None]],
                connections: ConnectionTable | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; reports the bound URLs
    (``http://host:port``, or ``https://`` with ``tls_cert_file``) when listening (port 0 picks a
    free port). Connections are capped and every request phase has its deadline
    (``rbee/_transport.py``); ``connections``, if given, is the table that counts them (for a
    server's metrics), its limit set here to what the descriptors allow."""
    http = HypercornConfig()
    address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    http.bind = [address]
    http.insecure_bind = []
    http.graceful_timeout = settings.shutdown_grace_s
    http.keep_alive_timeout = settings.keep_alive_timeout_s
    http.ssl_handshake_timeout = settings.header_timeout_s
    http.backlog = settings.backlog
    http.accesslog = None
    http.errorlog = logging.getLogger("rbee.http")
    # Reads are bounded per phase by _transport (a plain read timeout would also close stream
    # connections, whose clients send nothing).
    http.read_timeout = None
    http.h2_max_concurrent_streams = 16
    if settings.tls_cert_file is not None:
        check_server_files(settings)
        http.certfile, http.keyfile = settings.tls_cert_file, settings.tls_key_file
    connections = connections or ConnectionTable(settings.max_connections)
    connections.limit = fit_descriptors(settings.max_connections)
    try:
        sockets = http.create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            # Accepted connections inherit it. A client that stops reading leaves hypercorn's
            # (shielded) send blocked, and its connection cannot close until that send ends; the
            # kernel gives up on it after this long, which also bounds any wait at shutdown.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(settings.stall_timeout_s * 1000))
            sock.listen(http.backlog)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}",
                          address=address) from exc
    await serve_connections(wrap_app(app, http.wsgi_max_body_size, "asgi"), http, sockets,
                            settings, connections, shutdown_trigger=shutdown_trigger,
                            task_status=task_status)
