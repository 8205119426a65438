"""One task answering the frames of every ready channel (the memory store's queen).

A channel served by its own task pays trio's scheduling per frame: the task parks in
``wait_readable`` (an ``epoll_ctl`` to re-arm the socket), is woken, rescheduled and resumed
through several awaits, then parks again; at thousands of channels that was about 13 % of the
queen's CPU a heartbeat (docs/scale.md, "One task for every channel"). Here each channel whose
socket is plain is registered once in an epoll set of the hub's own; the hub waits on that set
(one ``wait_readable`` for all), and for each ready socket reads, answers every whole frame the
read completed (``HiveLink.take_now``: decoded, applied, stored, one answer each, in order) and
writes the answers, without a task switch.

The hub takes only the common case: whole, unfragmented binary frames within
``max_message_bytes``, answers the kernel takes at once. Anything else hands the channel back
to its own task (``park`` returns why) with every byte read so far, and the task does what it
always did: ping, close, a text or fragmented message, a protocol error (``RawWebSocket``), an
answer the kernel did not take whole (sent with the connection's wait), the peer gone. The
channel's task is parked meanwhile on an event, inside its cancel scope: a queen that stops,
or ``OpenChannels.reap`` closing a silent channel, cancels it as before, and the hub lets go.

Only with a store that writes without waiting (``Ingest.synchronous``: the memory store): a
shared store's write waits for Redis, and a channel waiting there must not hold every other.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
from typing import Protocol

import trio

from ..http.rawchannel import Next, RawWebSocket, frame

log = logging.getLogger("rbee.queen.channel")

READY_PER_ROUND = 64
"""Ready channels answered before the hub lets other tasks run (a few ms of frames at most)."""


class Link(Protocol):
    """What the hub needs of a channel's state (``HiveLink``)."""

    heard_at: float
    """trio time of the last answer (``OpenChannels.reap`` closes the silent)."""
    hive_id: str | None

    def answer_now(self, data: bytes) -> bytes:
        """The encoded answer to one frame's payload, the frame taken without waiting."""


class Back(enum.Enum):
    """Why the hub hands a channel back to its task."""

    FRAME = "a frame the hub does not take (control, text, fragment, too big, malformed)"
    WRITE = "an answer the kernel did not take whole"
    GONE = "the peer closed or reset the connection"


class _Parked:
    __slots__ = ("back", "event", "fd", "link", "socket", "unsent")

    def __init__(self, socket: RawWebSocket, link: Link) -> None:
        self.socket, self.link, self.fd = socket, link, socket.fd
        self.event = trio.Event()
        self.back = Back.GONE
        self.unsent = b""


class ChannelHub:
    """The epoll set of parked channels and the task (``run``) answering them."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        """The parked channels' sockets, while ``run`` runs."""
        self._parked: dict[int, _Parked] = {}
        self.answered = 0
        """Frames answered here (the rest by the channels' own tasks)."""
        self.handed_back = dict.fromkeys(Back, 0)

    def can_take(self, socket: object) -> bool:
        """Whether ``socket`` is one the hub can serve: a plain raw WebSocket (not TLS, not
        hypercorn's), open."""
        return (self._epoll is not None and type(socket) is RawWebSocket
                and socket.fd is not None and not socket.closed)

    async def run(self) -> None:
        """Answer ready channels until cancelled (``READY_PER_ROUND`` at a time); on leaving,
        the channels parked go on by their own tasks."""
        self._epoll = epoll = select.epoll()
        parked = self._parked
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, READY_PER_ROUND):
                    channel = parked.get(fd)
                    if channel is not None:
                        self._serve_or_end(channel, read=True)
        finally:
            for channel in list(parked.values()):
                self._hand_back(channel, Back.FRAME)
            self._epoll = None
            epoll.close()

    async def park(self, socket: RawWebSocket, link: Link) -> tuple[Back, bytes]:
        """Serve this channel here until it is handed back: why, and any answer still to send
        (``Back.WRITE``). Cancelled (the queen stops, the channel is reaped): let go at once."""
        channel = _Parked(socket, link)
        self._parked[channel.fd] = channel
        try:
            self._epoll.register(channel.fd, select.EPOLLIN)  # can_take: run is running
            if socket.buffer:
                self._serve_or_end(channel, read=False)
            await channel.event.wait()
        finally:
            self._let_go(channel)
        return channel.back, channel.unsent

    def _let_go(self, channel: _Parked) -> None:
        if self._parked.get(channel.fd) is channel:
            del self._parked[channel.fd]
            with contextlib.suppress(OSError, ValueError, AttributeError):  # closed meanwhile
                self._epoll.unregister(channel.fd)

    def _hand_back(self, channel: _Parked, why: Back) -> None:
        channel.back = why
        self.handed_back[why] += 1
        self._let_go(channel)
        channel.event.set()

    def _serve_or_end(self, channel: _Parked, *, read: bool) -> None:
        """``_serve``; a failure that is no refusal (a bug) ends that channel alone, logged, as
        it would end the channel's own task, never the hub and every channel with it."""
        try:
            self._serve(channel, read=read)
        except Exception:
            log.exception("hive channel %s: a frame failed; the channel is closed",
                          channel.link.hive_id or "(no hive yet)")
            channel.socket.closed = True  # no close frame after an unknown failure
            self._hand_back(channel, Back.GONE)

    def _serve(self, channel: _Parked, *, read: bool) -> None:
        """Read what is there, answer each whole frame in it (``RawWebSocket.next_plain``), keep
        the rest in the socket's buffer for the next read."""
        socket, link = channel.socket, channel.link
        if read:
            try:
                data = os.read(channel.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                return self._hand_back(channel, Back.GONE)
            socket.buffer = socket.buffer + data if socket.buffer else data
        while (message := socket.next_plain()) is not Next.MORE:
            if message is Next.OTHER:
                return self._hand_back(channel, Back.FRAME)
            out = frame(0x2, link.answer_now(message))
            del message
            self.answered += 1
            try:
                written = os.write(channel.fd, out)  # non-blocking (trio's socket)
            except BlockingIOError:
                written = 0
            except OSError:
                return self._hand_back(channel, Back.GONE)
            link.heard_at = trio.current_time()
            if written < len(out):
                channel.unsent = out[written:]
                return self._hand_back(channel, Back.WRITE)
        return None
