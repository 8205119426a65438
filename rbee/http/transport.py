"""The connection layer under the queen's and the hive's HTTP servers: hypercorn's trio worker,
with every phase of a request bounded and the number of connections capped.

Hypercorn alone bounds only an idle keep-alive connection (its timer stops when a request starts)
and reads with no deadline, so a client that sends its headers, then one body byte every few
seconds, holds a connection forever; and it accepts until the process runs out of descriptors.
Here each connection reads under the deadline of its phase:

- **headers**: from the first byte of a request, its headers must be in within
  ``http.header_timeout_s`` (before any byte, hypercorn's keep-alive timer applies);
- **body**: from the end of the headers, the body must be whole within ``http.body_timeout_s``;
- **response**: no read deadline (a stream client sends nothing while it listens; one that stops
  reading is dropped by the kernel after ``http.stall_timeout_s``).

At most ``http.max_connections`` connections are open at once. A new one past the cap closes the
connection that has been idle longest (no request in flight: a keep-alive or one still sending
headers), so idle sockets cannot lock real clients out; when every connection is busy, the new one
is answered 503 and closed. The descriptors this needs are checked at start (``fit_descriptors``).

HTTP/2 is spoken only over TLS (ALPN): over plain TCP a prior-knowledge preface or an ``Upgrade:
h2c`` closes the connection, so HTTP/1.1's phase deadlines hold for every plain connection.
"""

from __future__ import annotations

import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from math import inf
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H2ProtocolAssumedError, H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import parse_socket_addr, repr_socket_addr

from .._logs import RateLimitedLog
from ..config import HttpSettings
from .rawpost import RawRoutes, serve_raw

log = logging.getLogger("rbee.http")

DESCRIPTOR_RESERVE = 64
"""Descriptors kept beside the connections: listening sockets, log files, the hive's cgroup and
/proc reads, outgoing HTTP clients."""

_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
               b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_BUSY_SEND_S = 1.0


def fit_descriptors(max_connections: int) -> int:
    """The number of connections this process can hold: ``max_connections`` with the soft
    RLIMIT_NOFILE raised to fit it (up to the hard limit), or fewer, with a warning naming the
    key, when even the hard limit is too low. So the server sheds connections before ``accept``
    fails with "Too many open files"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + DESCRIPTOR_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - DESCRIPTOR_RESERVE)
        log.warning("http.max_connections is %d but the descriptor limit (RLIMIT_NOFILE) is %d: "
                    "capped at %d connections; raise LimitNOFILE (ulimit -n) to at least %d",
                    max_connections, soft, fitted, needed)
        return fitted
    return max_connections


class ConnectionTable:
    """The open connections, and which of them has been idle longest (the first to go)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._idle: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.shed_total = 0
        """Connections refused or evicted because the table was full."""
        self.timed_out_total = 0
        """Connections closed because a request's headers or body came too slowly."""
        self.draining = False

    def admit(self) -> bool:
        """Make room for one more connection: True if it may be served."""
        if self.open >= self.limit:
            if not self._idle:
                self.shed_total += 1
                return False
            oldest, _ = self._idle.popitem(last=False)
            oldest.evict()
            self.shed_total += 1
        self.open += 1
        return True

    def idle(self, connection: GuardedConnection) -> None:
        self._idle[connection] = None
        self._idle.move_to_end(connection)

    def busy(self, connection: GuardedConnection) -> None:
        self._idle.pop(connection, None)

    def closed(self, connection: GuardedConnection) -> None:
        self._idle.pop(connection, None)
        self.open -= 1

    def drain(self) -> None:
        """The server stops: connections waiting between raw requests close now (hypercorn's
        own close at its ``terminated`` event)."""
        self.draining = True
        for connection in list(self._idle):
            connection.stop_waiting()


class _PlainH11(H11Protocol):
    """HTTP/1.1 on a plain connection: a prior-knowledge HTTP/2 preface ends the connection, and
    an ``Upgrade: h2c`` is not taken up (the request is answered in HTTP/1.1)."""

    async def _check_protocol(self, event: h11.Request) -> None:
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            raise H2ProtocolAssumedError(b"")


class _Http1OnlyWrapper(ProtocolWrapper):
    """Hypercorn's protocol switch, never switching to HTTP/2 on a plain connection."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if not self.ssl:
            self.protocol = _PlainH11(self.app, self.config, self.context, self.task_group,
                                      self.state, self.ssl, self.client, self.server, self.send)

    async def handle(self, event: Event) -> None:
        if self.ssl:
            return await super().handle(event)
        try:
            return await self.protocol.handle(event)
        except H2ProtocolAssumedError:
            await self.send(Closed())


_UNKNOWN = object()


class GuardedConnection(TCPServer):
    """Hypercorn's connection with its reads under the deadline of the request's phase, its
    idleness reported to the ``ConnectionTable``, and no HTTP/2 without TLS."""

    def __init__(self, table: ConnectionTable, settings: HttpSettings, timeouts: RateLimitedLog,
                 raw: RawRoutes | None, *args: Any) -> None:
        super().__init__(*args)
        self.table = table
        self.settings = settings
        self._timeouts = timeouts
        self._raw = raw
        self._waiting: trio.CancelScope | None = None
        """Set while a raw connection waits between requests (``stop_waiting`` ends it)."""
        self._scope = trio.CancelScope()
        self._request_started_at: float | None = None
        """trio time of the first byte of the request being read (None between requests)."""
        self._body_started_at: float | None = None
        self._read_fd: int | object | None = _UNKNOWN
        """``socket_fd()``, asked once (it costs a system call)."""

    def evict(self) -> None:
        self._scope.cancel()

    def stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()

    # -- what serve_raw needs (rbee/http/rawpost.py) --

    async def receive_by(self, deadline: float, phase: str | None) -> bytes | None:
        if phase is None:
            if self.table.draining:
                return None
            try:
                with trio.CancelScope(deadline=deadline) as self._waiting:
                    return await self.receive_some()
            finally:
                self._waiting = None
            return None  # idle past keep_alive_timeout_s, or the server stops
        with trio.move_on_at(deadline):
            return await self.receive_some()
        self._timed_out(phase)
        return None

    async def receive_some(self) -> bytes:
        """The next bytes, with no deadline (b"": the peer left, or the connection closed). On
        a plain socket, trio's wait for it to be readable and then one ``os.read``: a raw route
        reads once it has answered, when nothing is there yet, and ``SocketStream.receive_some``
        first tries a read that fails and wraps each in a generator's context manager (17-20 µs
        a read against 33 µs, 3,000 sockets in one trio loop; docs/scale.md). Over TLS, the
        stream's own read."""
        fd = self._read_fd
        if fd is _UNKNOWN:
            fd = self._read_fd = self.socket_fd()
        try:
            if fd is None:
                return await self.stream.receive_some(MAX_RECV)
            while True:
                await trio.lowlevel.wait_readable(fd)  # ClosedResourceError once trio closes it
                try:
                    return os.read(fd, MAX_RECV)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return b""  # reset
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return b""

    async def send(self, data: bytes) -> bool:
        try:
            await self.stream.send_all(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def busy(self) -> None:
        self.table.busy(self)

    def socket_fd(self) -> int | None:
        """The plain socket's descriptor for writes past trio (``rawstream.DirectWrite``): only
        while it is non-blocking, as trio keeps its sockets, so such a write never waits."""
        if not isinstance(self.stream, trio.SocketStream):
            return None
        fd = self.stream.socket.fileno()
        return None if os.get_blocking(fd) else fd

    def idle(self) -> None:
        self.table.idle(self)

    def _timed_out(self, phase: str) -> None:
        self.table.timed_out_total += 1
        self._timeouts.warning("closed a connection whose request %s took longer than "
                               "http.%s_timeout_s", phase, phase.removesuffix("s"))

    async def run(self) -> None:
        if not self.table.admit():
            await self._refuse()
            return
        self.table.idle(self)
        try:
            with self._scope:
                await self._serve()
        finally:
            self.table.closed(self)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _refuse(self) -> None:
        """Answer 503 (briefly, without reading) and close: the server is full of busy
        connections. Over TLS the handshake is not even attempted."""
        with trio.move_on_after(_BUSY_SEND_S):
            if isinstance(self.stream, trio.SocketStream):
                message = (b'{"status":"error","message":"too many connections (http.max_connections: '
                           + str(self.table.limit).encode() + b'); retry later"}')
                try:
                    await self.stream.send_all(_BUSY_REPLY % (len(message), message))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _serve(self) -> None:
        """Hypercorn's ``TCPServer.run`` with our protocol wrapper."""
        if isinstance(self.stream, trio.SSLStream):
            try:
                with trio.fail_after(self.settings.header_timeout_s):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn_protocol = self.stream.selected_alpn_protocol()
            socket = self.stream.transport_stream.socket
            ssl = True
        else:
            alpn_protocol = "http/1.1"
            socket = self.stream.socket
            ssl = False
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            held = b""
            if self._raw is not None and alpn_protocol != "h2":
                held = await serve_raw(self, self._raw, f"{client[0]}:{client[1]}" if client
                                       else "-", trio.current_time)
                if held is None:
                    return
            async with TaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _Http1OnlyWrapper(
                    self.app, self.config, self.context, task_group, ConnectionState(self.state),
                    ssl, client, server, self.protocol_send, alpn_protocol)
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                if held:  # a request the raw routes left to the app: its head's deadline runs on
                    self._request_started_at = trio.current_time()
                    await self.protocol.handle(RawData(held))
                await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            # A request's headers are in (idle=False) or its exchange is over (idle=True): either
            # way the deadlines measured so far belong to a request that is gone. Each request on
            # a kept-alive connection gets its own header and body deadlines.
            self._request_started_at = self._body_started_at = None
            if event.idle:
                self.table.idle(self)
            else:
                self.table.busy(self)
        await super().protocol_send(event)

    def _read_deadline(self) -> float:
        """When the read now starting must have returned, by the phase of the request."""
        protocol = self.protocol.protocol
        if not isinstance(protocol, H11Protocol):
            return inf  # HTTP/2 (TLS only): the app bounds each body (``read_body``)
        state = protocol.connection.their_state
        if state is h11.IDLE:
            if self._request_started_at is None:
                return inf  # between requests: hypercorn's keep-alive timer
            return self._request_started_at + self.settings.header_timeout_s
        if state is h11.SEND_BODY:
            if self._body_started_at is None:
                self._body_started_at = trio.current_time()
            return self._body_started_at + self.settings.body_timeout_s
        return inf  # the request is in: its response may take as long as it takes

    async def _read_data(self) -> None:
        while True:
            deadline = self._read_deadline()
            try:
                with trio.move_on_at(deadline) as waited:
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if waited.cancelled_caught:
                self._timed_out("body" if self._body_started_at is not None else "headers")
                break
            if (data and self._request_started_at is None
                    and isinstance(self.protocol.protocol, H11Protocol)
                    and self.protocol.protocol.connection.their_state is h11.IDLE):
                self._request_started_at = trio.current_time()
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())
        # Done with this connection: end its keep-alive timer too, so that it leaves the table
        # now (hypercorn's own loop would leave the task waiting out keep_alive_timeout_s).
        self._scope.cancel()


async def serve_connections(app: AppWrapper, http: HypercornConfig, sockets: Sockets,
                            settings: HttpSettings, table: ConnectionTable, *,
                            shutdown_trigger: Callable[[], Awaitable[None]],
                            task_status: trio.TaskStatus[list[str]],
                            raw: RawRoutes | None = None) -> None:
    """Hypercorn's ``worker_serve`` for apps without a lifespan (ours have none): accept on
    ``sockets`` until ``shutdown_trigger`` returns, then give requests in flight
    ``http.graceful_timeout``; ``table`` holds the connections; ``raw``, the POSTs connections
answer themselves (``rbee/http/rawpost.py``). Reports the bound URLs."""
    context = WorkerContext(None)
    timeouts = RateLimitedLog(logging.getLogger("rbee.http.clients"))
    ssl_context = http.create_ssl_context()
    listeners: list[trio.abc.Listener[Any]] = []
    urls = []
    for sock in sockets.secure_sockets:
        listeners.append(trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                          ssl_context, https_compatible=True))
        urls.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
    state: dict[str, Any] = {}
    handler = partial(GuardedConnection, table, settings, timeouts, raw, app, http, context,
                      ConnectionState(state))
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(partial(trio.serve_listeners, handler, listeners,
                                         handler_nursery=connections))
            task_status.started(urls)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        table.drain()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + http.graceful_timeout
