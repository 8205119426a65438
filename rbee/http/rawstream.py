"""Event streams a connection serves itself: the queen's live stream without hypercorn's ASGI
messages, h11's chunking and sse-starlette's task group per frame.

Each frame a stream sends to a client went through about a dozen layers (sse-starlette, the
exception middleware, hypercorn's stream, h11, its TCP server, trio's stream) at ~150 µs each
time; with 100 clients that is 15 ms before the last one has an event, and fan-out latency is
exactly that sum. Here a frame is one ``send_all`` on the client's socket.

A request is taken here only when it can be answered here in full: ``GET <stream path>[?query]
HTTP/1.1`` with a Host, no body, a well-formed head (``rawpost``'s rules), and a stream the route
opens for this caller. Anything else, and a refusal by the route (a missing token, a bad filter,
too many clients), goes to the app, which answers as it always did. The response has no length
and no chunking: its body ends when the connection closes (``connection: close``), which every
SSE client reads. A keep-alive comment goes out after ``keepalive_s`` without an event; the
client closing its side ends the stream at once (nothing waits for a write to notice).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Protocol

import trio
from starlette.datastructures import QueryParams

from .errors import ApiError

KEEPALIVE = b": ping\r\n\r\n"
HEAD = (b"HTTP/1.1 200 \r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-store\r\nx-accel-buffering: no\r\nconnection: close\r\n"
        b"server: hypercorn-h11\r\n\r\n")


class DirectWrite:
    """A write straight to the client's socket from whoever has a frame for it (the broadcaster,
    as it publishes), when its connection is not writing: the frame is in the kernel without a
    task switch, which is most of what a frame costs per client. Returns the bytes written (0
    while the connection writes, when the socket is full, or on any error: the connection's
    own write then takes the frame and meets the error)."""

    __slots__ = ("busy", "fd", "partial")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.busy = 0
        """The connection's own writes under way or waiting (none: the publisher may write)."""
        self.partial = False
        """A frame went out in part: its rest is the connection's next write, and nothing (a
        keep-alive) may come between."""

    def __call__(self, data: bytes) -> int:
        if self.busy:
            return 0
        try:
            written = os.write(self.fd, data)  # the socket is non-blocking (trio's)
        except OSError:
            return 0
        self.partial = written < len(data)
        return written


class StreamHead:
    """A stream request as its route sees it: enough of Starlette's ``Request`` for the checks
    made of a reader (``rbee/http/auth.py``) and for the route's own query; ``direct`` writes to
    its socket (None over TLS)."""

    __slots__ = ("client", "direct", "headers", "method", "path", "query_params")

    def __init__(self, path: str, query: str, headers: dict[str, str], client: str,
                 direct: DirectWrite | None = None) -> None:
        self.method, self.path, self.headers, self.client = "GET", path, headers, client
        self.query_params = QueryParams(query)
        self.direct = direct

    @property
    def url(self) -> StreamHead:
        return self  # ``request.url.path``


class RawStream(Protocol):
    """One stream answered by the connection: ``open`` gives its frames, or raises an
    ``ApiError`` (the app then answers the request, refusing it as it would anyway)."""

    keepalive_s: float

    def open(self, head: StreamHead) -> AsyncIterator[bytes]: ...


class StreamConnection(Protocol):
    async def receive_by(self, deadline: float, phase: str | None) -> bytes | None: ...

    async def receive_some(self) -> bytes:
        """The next bytes, with no deadline (b"": the peer left)."""

    async def send(self, data: bytes) -> bool:
        """False once the peer is gone (or the stall timeout cut it off)."""

    def busy(self) -> None: ...

    def socket_fd(self) -> int | None:
        """The plain socket's descriptor (None over TLS)."""


def opened(route: RawStream, head: StreamHead) -> AsyncIterator[bytes] | None:
    """The stream ``route`` opens for ``head``, or None when the app is to answer it."""
    try:
        return route.open(head)
    except ApiError:
        return None


async def serve_stream(connection: StreamConnection, frames: AsyncIterator[bytes],
                       keepalive_s: float, direct: DirectWrite | None) -> None:
    """Write the response and every frame until the stream ends, the client goes, or its
    socket breaks; the connection closes after. ``direct`` is told when it must not write."""
    connection.busy()
    lock = trio.Lock()
    last_write = trio.current_time()
    direct = direct or DirectWrite(-1)

    async def write(data: bytes) -> bool:
        nonlocal last_write
        direct.busy += 1  # from before the lock is taken: a write waiting for it comes first
        try:
            async with lock:
                last_write = trio.current_time()
                return await connection.send(data)
        finally:
            direct.busy -= 1

    async def keep_alive(cancel: trio.CancelScope) -> None:
        """A comment after ``keepalive_s`` without a write of the connection's own (frames the
        publisher wrote directly do not count: a comment among them costs nothing)."""
        nonlocal last_write
        while True:
            await trio.sleep_until(last_write + keepalive_s)
            if trio.current_time() < last_write + keepalive_s:
                continue  # written meanwhile
            if direct.partial:  # the rest of a frame goes first; the comment waits a turn
                last_write = trio.current_time()
                continue
            if not await write(KEEPALIVE):
                cancel.cancel()
                return

    async def watch_peer(cancel: trio.CancelScope) -> None:
        while await connection.receive_some():
            pass  # anything a client sends after its request is not ours to read
        cancel.cancel()  # it closed its side

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_peer, nursery.cancel_scope)
            if await write(HEAD):
                nursery.start_soon(keep_alive, nursery.cancel_scope)
                async for frame in frames:
                    if not await write(frame):
                        break
                    direct.partial = False  # a frame's rest, if any, went first
            nursery.cancel_scope.cancel()
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()
