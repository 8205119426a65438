"""POSTs a connection answers itself: a server's hot route (the queen's heartbeat) served without
hypercorn's task and ASGI messages per request, nor Starlette's middleware and routing.

Every HTTP/1.1 connection of a server with such routes starts here (``app.state.raw_posts``, path
to ``RawPost``). A request is taken here only when it can be answered here in full: ``POST
<raw path> HTTP/1.1`` with a Host, one Content-Length within ``http.max_body_bytes``, no
Transfer-Encoding or Expect, a Content-Encoding of gzip or none, a well-formed head, room in the
body budget, and a caller the route's ``admit`` accepts. Anything else (another path or method, a
refused caller, a body too big, a head h11 would refuse) hands the connection, with every byte
read so far, to hypercorn and the Starlette app for good, and they answer as they always did:
same statuses, same error bodies, same logs. A refusal once the body is read (bad JSON or gzip,
another hive's id, admission, the store) answers through the app's ``Refusals``: the same JSON.

The same connection also answers the raw GETs (``raw_gets``: one JSON), event streams
(``raw_streams``, ``rbee/http/rawstream.py``) and WebSocket upgrades (``raw_sockets``, the hive
channel, ``rbee/http/rawchannel.py``) under the same rule: taken here only when whole, else the
app's.

The deadlines are the transport's (``rbee/http/transport.py``): the head within
``http.header_timeout_s`` of its first byte, the body within ``http.body_timeout_s`` of the head,
and ``http.keep_alive_timeout_s`` between requests; a connection waiting between requests closes
at once when the server stops.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.handlers import format_date_time

from ..config import HttpSettings
from .app import Refusals, internal_error_body
from .bodies import BodyBudget, gunzip_limited
from .errors import ApiError
from .rawchannel import RawSocket, serve_socket, upgrade_key
from .rawstream import DirectWrite, RawStream, StreamConnection, StreamHead, opened, serve_stream

log = logging.getLogger("rbee.http")

HEAD_LIMIT = 16 * 2**10
"""A longer head is left to h11 (which refuses past the same size)."""

_FIELD = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*([\x21-\x7e\x80-\xff]"
                    rb"(?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?[ \t]*")
"""One header line as RFC 9110 has it (no obs-fold): a token, a colon, a trimmed value."""


class RawHead:
    """A request as a raw route sees it before its body: enough of Starlette's ``Request`` for
    the checks made of every caller (``rbee/http/auth.py`` reads ``headers``, ``method`` and
    ``url.path``)."""

    __slots__ = ("client", "headers", "method", "path", "query")

    def __init__(self, path: str, headers: dict[str, str], client: str, method: str = "POST",
                 query: str = "") -> None:
        self.method, self.path, self.headers, self.client = method, path, headers, client
        self.query = query
        """A raw GET's query string, as sent (still percent-encoded)."""

    @property
    def url(self) -> RawHead:
        return self  # ``request.url.path``


class RawPost(Protocol):
    """One route answered by the connection: ``admit`` checks the caller from the head alone
    (an ``ApiError`` hands the request to the app, which refuses it as usual); ``answer`` takes
    the whole body (inflated) and returns the 200's JSON, or raises what ``Refusals`` answers."""

    def admit(self, head: RawHead) -> Any: ...

    async def answer(self, head: RawHead, admitted: Any, body: bytes) -> bytes: ...


class RawConnection(Protocol):
    """What the exchange needs of its connection (``GuardedConnection``)."""

    async def receive_by(self, deadline: float, phase: str | None) -> bytes | None:
        """Bytes read by ``deadline``; b"" at the end of the stream; None when the deadline
        passed (``phase`` "headers" or "body": counted and logged; None: an idle keep-alive)
        or the server is stopping while it waited between requests."""

    async def send(self, data: bytes) -> bool:
        """False once the peer is gone."""

    def busy(self) -> None: ...

    def idle(self) -> None: ...

    def socket_fd(self) -> int | None: ...


@dataclass(slots=True)
class RawRoutes:
    """A server's raw routes and what answering them needs, from its app's state."""

    routes: Mapping[bytes, RawPost]
    refusals: Refusals
    budget: BodyBudget
    settings: HttpSettings
    streams: Mapping[bytes, RawStream] = dataclasses.field(default_factory=dict)
    """GETs answered as event streams (``rbee/http/rawstream.py``)."""
    gets: Mapping[bytes, RawPost] = dataclasses.field(default_factory=dict)
    """GETs answered as one JSON (the queen's ``/v1/pick``): ``answer`` gets an empty body,
    the query in ``head.query``."""
    sockets: Mapping[bytes, RawSocket] = dataclasses.field(default_factory=dict)
    """GETs upgraded to a WebSocket (the queen's hive channel, ``rbee/http/rawchannel.py``)."""

    @classmethod
    def of(cls, state: Any, settings: HttpSettings) -> RawRoutes | None:
        """The raw routes of an app built by ``json_app`` (None without any)."""
        routes = getattr(state, "raw_posts", None) or {}
        streams = getattr(state, "raw_streams", None) or {}
        gets = getattr(state, "raw_gets", None) or {}
        sockets = getattr(state, "raw_sockets", None) or {}
        if not routes and not streams and not gets and not sockets:
            return None
        return cls({path.encode(): route for path, route in routes.items()}, state.refusals,
                   state.body_budget, settings,
                   {path.encode(): stream for path, stream in streams.items()},
                   {path.encode(): route for path, route in gets.items()},
                   {path.encode(): route for path, route in sockets.items()})


_date = (0, b"")


def _date_header() -> bytes:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, format_date_time(now).encode())
    return _date[1]


def response(status: int, body: bytes, headers: Mapping[str, str] | None, close: bool) -> bytes:
    """The bytes of a JSON answer, with the headers hypercorn would add (date, server)."""
    lines = [b"HTTP/1.1 %d " % status,  # no reason phrase, as hypercorn's h11 sends it
             b"content-type: application/json", b"content-length: %d" % len(body),
             b"date: " + _date_header(), b"server: hypercorn-h11"]
    for name, value in (headers or {}).items():
        lines.append(f"{name.lower()}: {value}".encode("latin-1"))
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _fields(lines: list[bytes]) -> dict[str, str] | None:
    """A head's header fields, or None for one that is the app's to answer (or refuse)."""
    headers: dict[str, str] = {}
    for line in lines:
        field = _FIELD.fullmatch(line)
        if field is None:
            return None
        name = field[1].lower().decode()
        if name in headers:
            return None  # repeated fields are the app's to combine (or refuse)
        headers[name] = (field[2] or b"").decode("latin-1")
    return headers


def _stream(head: bytes, routes: RawRoutes, client: str, direct: DirectWrite | None
            ) -> tuple[RawStream, AsyncIterator[bytes]] | None:
    """The stream a ``GET`` opens when it is taken here, else None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    path, _, query = parts[1].partition(b"?")
    route = routes.streams.get(path)
    headers = _fields(lines[1:]) if route is not None else None
    if (headers is None or "host" not in headers or "transfer-encoding" in headers
            or headers.get("content-length", "0") != "0"):
        return None
    frames = opened(route, StreamHead(path.decode(), query.decode("latin-1"), headers, client,
                                      direct))
    return None if frames is None else (route, frames)


def _upgrade(head: bytes, route: RawSocket, client: str) -> tuple[Any, bytes] | None:
    """What the route admitted and the handshake's key, for an upgrade taken here; else None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    headers = _fields(lines[1:])
    if headers is None or "host" not in headers or (key := upgrade_key(headers)) is None:
        return None
    path, _, query = parts[1].partition(b"?")
    try:
        return route.admit(RawHead(path.decode(), headers, client, "GET",
                                   query.decode("latin-1"))), key
    except ApiError:
        return None  # the app refuses it, as it refuses it on any connection


def _parse(head: bytes, routes: RawRoutes, client: str
           ) -> tuple[RawPost, RawHead, int, bool, bool] | None:
    """The route, head, body length, gzip and close of a request taken here, else None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"POST", b"GET"):
        return None
    target, _, query = parts[1].partition(b"?")
    get = parts[0] == b"GET"
    route = routes.gets.get(target) if get else routes.routes.get(parts[1])
    if route is None or not query.isascii():
        return None
    headers = _fields(lines[1:])
    if headers is None:
        return None
    length = headers.get("content-length", "0" if get else "")
    if get and length != "0":
        return None
    if ("transfer-encoding" in headers or "expect" in headers or "host" not in headers
            or not (length.isascii() and length.isdigit())
            or int(length) > routes.settings.max_body_bytes):
        return None
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        return None
    close = "close" in (token.strip() for token in headers.get("connection", "").lower().split(","))
    head = (RawHead(target.decode(), headers, client, "GET", query.decode()) if get
            else RawHead(parts[1].decode(), headers, client))
    return route, head, int(length), encoding == "gzip", close


async def serve_raw(connection: RawConnection | StreamConnection, routes: RawRoutes, client: str,
                    clock: Any) -> bytes | None:
    """Answer the connection's requests while they are raw routes'. Returns the bytes read of
    the first one that is not (its start: hypercorn's from there on), or None once the
    connection is done (closed by the peer, timed out, asked to close, or the server stops).
    ``clock``: trio's ``current_time``."""
    settings, buffer = routes.settings, b""
    while True:
        started = clock() if buffer else None
        idle_until = clock() + settings.keep_alive_timeout_s
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > HEAD_LIMIT:
                return buffer
            if started is None:
                data = await connection.receive_by(idle_until, None)
                started = clock()
            else:
                data = await connection.receive_by(started + settings.header_timeout_s, "headers")
            if not data:
                return None if data is None or not buffer else buffer
            buffer += data
        target = buffer[4:end].partition(b" ")[0].partition(b"?")[0]
        if routes.sockets and buffer.startswith(b"GET ") and target in routes.sockets:
            upgrade = _upgrade(buffer[:end], routes.sockets[target], client)
            if upgrade is None:
                return buffer
            await serve_socket(connection, routes.sockets[target], upgrade[0], upgrade[1],
                               buffer[end + 4:], settings)
            return None
        if routes.streams and buffer.startswith(b"GET ") and target not in routes.gets:
            fd = connection.socket_fd()
            direct = None if fd is None else DirectWrite(fd)
            stream = _stream(buffer[:end], routes, client, direct)
            if stream is None:
                return buffer
            await serve_stream(connection, stream[1], stream[0].keepalive_s, direct)
            return None
        parsed = _parse(buffer[:end], routes, client)
        if parsed is None:
            return buffer
        route, head, size, gzipped, close = parsed
        try:
            admitted = route.admit(head)
            routes.budget.take(size, size)
        except ApiError:
            return buffer  # the app refuses it, as it refuses it on any connection
        connection.busy()
        try:
            body, body_by = buffer[end + 4:], clock() + settings.body_timeout_s
            while len(body) < size:
                data = await connection.receive_by(body_by, "body")
                if not data:
                    return None
                body += data
        finally:
            routes.budget.give_back(size)
        buffer = body[size:]
        status, payload, headers = await _answer(route, head, admitted, body[:size], gzipped,
                                                 routes)
        close = close or status == 500
        await connection.send(response(status, payload, headers, close))
        if close:
            return None
        connection.idle()


async def _answer(route: RawPost, head: RawHead, admitted: Any, body: bytes, gzipped: bool,
                  routes: RawRoutes) -> tuple[int, bytes, Mapping[str, str] | None]:
    try:
        if gzipped:
            body = gunzip_limited(body, routes.settings.max_body_bytes)
        return 200, await route.answer(head, admitted, body), None
    except Exception as exc:
        if isinstance(exc, ApiError) or any(isinstance(exc, kind)
                                            for kind in routes.refusals.statuses):
            return routes.refusals.answer(exc, head.client, head.method, head.path)
        log.exception("%s %s from %s failed", head.method, head.path, head.client)
        return 500, internal_error_body(exc), None
