"""WebSockets a connection serves itself: the hive's channel without hypercorn's wsproto, its ASGI
messages and Starlette's ``WebSocket`` per frame.

A request is taken here (``rawpost.serve_raw`` decides) only when it is a plain RFC 6455 opening
handshake to a raw socket route: ``GET <path> HTTP/1.1`` with a Host, ``Upgrade: websocket``,
``Connection: upgrade``, ``Sec-WebSocket-Version: 13``, a ``Sec-WebSocket-Key`` of 16 bytes in
base64, no body, and a caller the route's ``admit`` accepts. Anything else (another version, a
refused caller, a route switched off) goes to hypercorn and the app, which answer as they always
did (401 JSON, 403, 400). No extension is negotiated (a client offering permessage-deflate gets
plain frames, as RFC 6455 allows) and no subprotocol is chosen.

Frames: RFC 6455 section 5. A client's frames are masked (an unmasked one, reserved bits, an
unknown opcode, a fragmented or long control frame, a continuation out of place: close 1002 naming
the problem; a text message that is not UTF-8: 1007; a message over ``max_message_bytes``: 1009,
its payload unread). Unmasking is one numpy XOR over the payload (about 2 µs for a 3.5 KB frame,
against 15 µs through wsproto's frame protocol: ``bench/test_bench_rawchannel.py``). Fragments
are joined into one message; a ping is answered with a pong at once; a close is echoed and ends
the session. Each message the route sends is one unmasked binary frame.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from ..config import HttpSettings
from .masking import unmask
from .rawstream import StreamConnection

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009


class MessageSocket(Protocol):
    """A WebSocket as a route's session sees it, whichever server carries it: whole messages in,
    binary messages out."""

    async def receive(self) -> bytes | str | None:
        """The next whole message (bytes, or str for a text message); None once the peer closed
        or left, or the socket closed for a protocol error."""

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class RawSocket(Protocol):
    """One WebSocket route answered by the connection: ``admit`` checks the caller from the
    upgrade's head alone (an ``ApiError`` hands the request to the app, which answers it as it
    would anyway); ``serve`` runs the session once the connection is upgraded."""

    max_message_bytes: int
    """A bigger message closes the socket (1009)."""

    def admit(self, head: Any) -> Any: ...

    async def serve(self, socket: MessageSocket, admitted: Any) -> None: ...


def upgrade_key(headers: Mapping[str, str]) -> bytes | None:
    """The ``Sec-WebSocket-Key`` of a plain version-13 opening handshake, or None for any other
    request (the app's to answer)."""
    if (headers.get("upgrade", "").strip().lower() != "websocket"
            or "upgrade" not in (token.strip().lower()
                                 for token in headers.get("connection", "").split(","))
            or headers.get("sec-websocket-version", "").strip() != "13"
            or "transfer-encoding" in headers or headers.get("content-length", "0") != "0"):
        return None
    key = headers.get("sec-websocket-key", "").strip().encode("latin-1")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


def accepted(key: bytes) -> bytes:
    """The 101 answer to a handshake with ``key``: no extension, no subprotocol."""
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    return (b"HTTP/1.1 101 \r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + accept + b"\r\nserver: hypercorn-h11\r\n\r\n")


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server's)."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


class Refused(Exception):
    """The peer broke the protocol: the socket closes with ``code`` and this message."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class RawWebSocket:
    """A server's end of a WebSocket on a raw connection (``MessageSocket``)."""

    def __init__(self, connection: StreamConnection, max_message_bytes: int,
                 settings: HttpSettings, buffered: bytes = b"") -> None:
        self.connection, self.max_message_bytes = connection, max_message_bytes
        self.settings = settings
        self.fd = connection.socket_fd()
        """The plain socket, written to directly (None over TLS): the session's one task is
        its only writer, and a short frame is in the kernel at once, without trio's
        ``send_all`` (a tenth of a channel heartbeat's cost on the queen)."""
        self.buffer = buffered
        self.closed = False
        """A close frame went out: nothing more is sent."""
        self._parts: list[bytes] | None = None
        """The fragments of a message under way."""
        self._opcode = _BINARY
        self._size = 0

    async def receive(self) -> bytes | str | None:
        try:
            while not self.closed:
                next_frame = self._next_frame()
                if next_frame is None:
                    data = await self.connection.receive_some()
                    if not data:
                        self.closed = True
                        return None
                    self.buffer = self.buffer + data if self.buffer else data
                    continue
                message = await self._take(*next_frame)
                if message is not None:
                    return message
        except Refused as problem:
            await self._refuse(problem)
        return None

    async def send_bytes(self, data: bytes) -> None:
        if not self.closed:
            await self._send(frame(_BINARY, data))

    async def send_framed(self, data: bytes) -> bool:
        """The rest of a frame begun elsewhere (the channel hub's answer the kernel did not
        take whole); False once the peer is gone."""
        return await self._send(data)

    def next_plain(self) -> bytes | Next:
        """The common case without a wait: the buffer's first frame when it is a whole binary
        message in one frame within ``max_message_bytes``, its payload taken out of the buffer
        and unmasked; ``Next.MORE`` while only its start is there; ``Next.OTHER`` for anything
        else (a control, text or fragmented frame, one too big or malformed: ``receive``'s)."""
        data = self.buffer
        if len(data) < 2:
            return Next.MORE
        if data[0] != 0x80 | _BINARY or not data[1] & 0x80 or self._parts is not None:
            return Next.OTHER
        length = _length(data)
        if length is None:
            return Next.MORE
        size, start = length
        if size > self.max_message_bytes:
            return Next.OTHER
        if len(data) < start + 4 + size:
            return Next.MORE
        return self._cut(data, start, size)

    async def _send(self, data: bytes) -> bool:
        """False once the peer is gone."""
        if self.fd is not None:
            try:
                written = os.write(self.fd, data)  # non-blocking (``socket_fd``)
            except BlockingIOError:
                written = 0
            except OSError:
                self.closed = True
                return False
            if written == len(data):
                return True
            data = data[written:]
        return await self.connection.send(data)

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame; the connection closes right after (as hypercorn's does when
        its app closes the socket)."""
        if not self.closed:
            self.closed = True
            await self._send(frame(_CLOSE, struct.pack("!H", code) + reason.encode()[:123]))

    async def _refuse(self, problem: Refused) -> None:
        """Close for a broken protocol, then read until the peer's close frame
        (``http.shutdown_grace_s`` at most): with its frames unread the connection would end in
        a reset, and the peer might never read why."""
        await self.close(problem.code, str(problem))
        with trio.move_on_after(self.settings.shutdown_grace_s):
            while data := await self.connection.receive_some():
                self.buffer += data
                try:
                    while (next_frame := self._next_frame(closing=True)) is not None:
                        if next_frame[0] == _CLOSE:
                            return
                except Refused:
                    return

    def _next_frame(self, closing: bool = False) -> tuple[int, bool, bytes] | None:
        """The first whole frame in the buffer (opcode, final, payload unmasked), taken out of
        it; None until one is whole."""
        data = self.buffer
        if len(data) < 2:
            return None
        first, second = data[0], data[1]
        opcode, final = first & 0x0F, bool(first & 0x80)
        if first & 0x70:
            raise Refused(PROTOCOL_ERROR, "reserved bits set: no extension was negotiated")
        if not second & 0x80:
            raise Refused(PROTOCOL_ERROR, "an unmasked frame: a client masks every frame")
        length = _length(data)
        if length is None:
            return None
        size, start = length
        if opcode >= _CLOSE:
            if not final or size > 125:
                raise Refused(PROTOCOL_ERROR, "a control frame fragmented or over 125 bytes")
        elif self._size + size > self.max_message_bytes and not closing:
            raise Refused(MESSAGE_TOO_BIG, f"a message over {self.max_message_bytes} bytes")
        if len(data) < start + 4 + size:
            return None
        return opcode, final, self._cut(data, start, size)

    def _cut(self, data: bytes, start: int, size: int) -> bytes:
        """The whole first frame's payload, unmasked (its mask at ``start``), taken out of the
        buffer."""
        self.buffer = data[start + 4 + size:]
        return unmask(data, start + 4, size, data[start:start + 4]) if size else b""

    async def _take(self, opcode: int, final: bool, payload: bytes) -> bytes | str | None:
        """The message this frame completes, if any; control frames answered here."""
        if opcode in (_BINARY, _TEXT):
            if self._parts is not None:
                raise Refused(PROTOCOL_ERROR, "a new message before the end of the last one")
            if final:
                return _message(opcode, payload)
            self._parts, self._opcode, self._size = [payload], opcode, len(payload)
        elif opcode == _CONTINUATION:
            if self._parts is None:
                raise Refused(PROTOCOL_ERROR, "a continuation frame outside a message")
            self._parts.append(payload)
            self._size += len(payload)
            if final:
                parts, self._parts, self._size = self._parts, None, 0
                return _message(self._opcode, b"".join(parts))
        elif opcode == _PING:
            await self._send(frame(_PONG, payload))
        elif opcode == _CLOSE:
            if len(payload) == 1:
                raise Refused(PROTOCOL_ERROR, "a close frame of one byte")
            self.closed = True  # echoed as it came (no code: none back)
            await self._send(frame(_CLOSE, payload[:2]))
            return None
        elif opcode != _PONG:
            raise Refused(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        return None


class Next(enum.Enum):
    """What ``next_plain`` found instead of a message."""

    MORE = "only the start of a frame: read more"
    OTHER = "a frame for ``receive``"


def _length(data: bytes) -> tuple[int, int] | None:
    """The size of the first frame's payload and where its mask begins; None until the
    extended length is in ``data`` (which holds the frame's first two bytes)."""
    size = data[1] & 0x7F
    if size == 126:
        return None if len(data) < 4 else (int.from_bytes(data[2:4], "big"), 4)
    if size == 127:
        return None if len(data) < 10 else (int.from_bytes(data[2:10], "big"), 10)
    return size, 2


def _message(opcode: int, payload: bytes) -> bytes | str:
    if opcode == _BINARY:
        return payload
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise Refused(INVALID_DATA, "a text message that is not UTF-8") from None


async def serve_socket(connection: StreamConnection, route: RawSocket, admitted: Any, key: bytes,
                       buffered: bytes, settings: HttpSettings) -> None:
    """Answer the handshake and run the route's session on the connection; the connection
    closes after."""
    connection.busy()  # never evicted as idle: a socket is a client's, as long as it lasts
    if not await connection.send(accepted(key)):
        return
    socket = RawWebSocket(connection, route.max_message_bytes, settings, buffered)
    await route.serve(socket, admitted)
