"""The queen's end of a hive's channel (``GET /v1/hive-channel``, a WebSocket of msgpack frames).

A hive on a channel costs the queen one decode of what changed and one registry write per beat,
with no HTTP request around it: no headers to parse, no middleware, no response to build. Each
connection keeps the hive's last whole heartbeat as the queen took it; a delta is applied to it
(``apply_delta``) and the whole heartbeat goes through ``Ingest.accept``, the very door a POST
goes through (same checks, goodbye, admission, store write), so the two transports cannot differ.

The caller is authenticated at the upgrade as a POST is (per-hive credential, shared token; TLS
is the server's), and refused with the status a POST would get (401, as JSON) before any frame.
Every frame is answered with one frame (``rbee/contract/channel.py``); a frame that cannot be
taken (garbage, the wrong type, too big, a delta without its base) is answered with what is wrong
and leaves the connection's state as it was.

The WebSocket is the connection's own (``rbee/http/rawchannel.py``: no wsproto, ASGI message or
Starlette ``WebSocket`` per frame) for every upgrade it can take; the rest reach the app's route
(hypercorn's WebSocket). Both run one session (``ChannelService.serve``). With the memory store a
plain channel's whole frames are answered by the queen's one hub task (``channelhub.py``), the
same ``HiveLink`` taking them without waiting (``take_now``); its own task does the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import trio
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._errors import ContractError
from .._logs import RateLimitedLog
from ..config import QueenConfig
from ..contract import (
    ChannelAck,
    ChannelDelta,
    ChannelError,
    ChannelResync,
    HiveHeartbeat,
    OperationalStatus,
    QueenFrame,
    Reply,
    apply_delta,
    decode_hive_frame,
    encode_frame,
    paths,
)
from ..http.app import JsonResponse
from ..http.errors import ApiError
from ..http.rawchannel import MessageSocket
from ..http.serving import WS_MESSAGE_BODIES
from .channelhub import Back, ChannelHub
from .ingest import Ingest
from .metrics import QueenMetrics
from .ticks import every

log = RateLimitedLog(logging.getLogger("rbee.queen.channel"))

Authenticate = Callable[..., "str | None"]
"""``Gate.hive``: the hive a caller may act as (``ANY_HIVE``: any), or ApiError 401."""


class _Upgrade:
    """The upgrade request as the HTTP auth functions read a request: headers, method, path."""

    method = "GET"

    def __init__(self, websocket: WebSocket) -> None:
        self.headers, self.url = websocket.headers, websocket.url


class HiveLink:
    """One channel's state: the hive's last whole heartbeat as the queen took it, and its seq."""

    def __init__(self, ingest: Ingest, acting_as: str | None, max_frame_bytes: int,
                 metrics: QueenMetrics) -> None:
        self.ingest, self.acting_as, self.max_frame_bytes = ingest, acting_as, max_frame_bytes
        self.metrics = metrics
        self.base: HiveHeartbeat | None = None
        self.seq = -1
        self.size = 0
        """The bytes of the last snapshot: what a delta's heartbeat is counted as (the stream's
        replay budget), since the whole heartbeat was never encoded."""
        self.hive_id: str | None = None
        self.heard_at = math.inf
        """trio time the last frame was answered (inf while one is: ``OpenChannels.reap``)."""
        self.idle = False
        """Closed for falling silent."""

    async def take(self, data: bytes) -> QueenFrame:
        """The answer to one frame; the state moves on only when the frame was taken."""
        step = self._read(data)
        if type(step) is not _Taking:
            return step
        try:
            await self.ingest.accept(step.heartbeat, step.size, self.acting_as, step.delta)
        except ApiError as exc:
            return _refusal(step, exc)
        return self._took(step)

    def answer_now(self, data: bytes) -> bytes:
        """The encoded answer to one frame, counted (``take_now``)."""
        started = time.perf_counter()
        answer = self.take_now(data)
        self.counted(answer, started)
        return encode_frame(answer)

    def counted(self, answer: QueenFrame, started: float) -> None:
        """An answer on the queen's metrics (and a refusal in its log)."""
        metrics = self.metrics
        if type(answer) is ChannelAck:
            metrics.received.inc()
            metrics.ingest.observe(time.perf_counter() - started)
        else:
            metrics.refusal(409 if type(answer) is ChannelResync else answer.status)
            log.warning("hive channel %s: %s", self.hive_id or "(no hive yet)",
                        answer.reason if type(answer) is ChannelResync else answer.message)

    def take_now(self, data: bytes) -> QueenFrame:
        """``take`` on a store that writes without waiting (``Ingest.synchronous``): the
        channel hub's, which answers the frames of every ready channel in one task."""
        step = self._read(data)
        if type(step) is not _Taking:
            return step
        try:
            self.ingest.accept_now(step.heartbeat, step.size, self.acting_as)
        except ApiError as exc:
            return _refusal(step, exc)
        return self._took(step)

    def _read(self, data: bytes) -> QueenFrame | _Taking:
        """The heartbeat a frame makes of this channel's state, or the answer refusing it."""
        if len(data) > self.max_frame_bytes:
            return ChannelError(status=413, message=f"frame of {len(data)} bytes, more than "
                                                    f"http.max_body_bytes ({self.max_frame_bytes})")
        try:
            frame = decode_hive_frame(data)
        except ContractError as exc:
            return ChannelError(status=400, message=str(exc))
        if type(frame) is ChannelDelta:
            if self.base is None or frame.seq != self.seq + 1:
                reason = ("no snapshot taken on this channel yet" if self.base is None else
                          f"delta {frame.seq} does not follow frame {self.seq}, the last taken")
                return ChannelResync(frame.seq, reason)
            try:
                heartbeat = apply_delta(self.base, frame)
            except ContractError as exc:
                return ChannelError(seq=frame.seq, status=400, message=str(exc))
            return _Taking(frame.seq, heartbeat, self.size, frame)
        heartbeat = frame.heartbeat
        if self.hive_id is not None and heartbeat.hive.id != self.hive_id:
            return ChannelError(seq=frame.seq, status=400, message=(
                f"invalid snapshot: hive {heartbeat.hive.id!r} on the channel of hive "
                f"{self.hive_id!r} (a channel carries one hive) - at `$.heartbeat.hive.id`"))
        return _Taking(frame.seq, heartbeat, len(data), None)

    def _took(self, step: _Taking) -> ChannelAck:
        heartbeat = step.heartbeat
        self.hive_id = heartbeat.hive.id
        stopped = heartbeat.hive.operational_status is OperationalStatus.STOPPED
        self.base = None if stopped else heartbeat
        self.seq, self.size = step.seq, step.size
        return ChannelAck(step.seq)


class _Taking(NamedTuple):
    """A frame read and ready for the store: the whole heartbeat it makes, counted as ``size``
    bytes (a snapshot's own; a delta's, its channel's last snapshot's)."""

    seq: int
    heartbeat: HiveHeartbeat
    size: int
    delta: ChannelDelta | None


def _refusal(step: _Taking, exc: ApiError) -> ChannelError:
    retry_after = (exc.headers or {}).get("Retry-After")
    return ChannelError(seq=step.seq, status=exc.status_code, message=exc.message,
                        retry_after_s=None if retry_after is None else float(retry_after))


class OpenChannels:
    """The channels open now: so that a queen that stops closes them at once (1001, going away)
    and their hives reconnect or fail over, instead of holding the stop for the whole
    ``http.shutdown_grace_s`` as requests in flight do; and so that one task (``reap``) closes
    those silent for ``idle_s``, where a deadline per channel would be moved twice a frame
    (trio's deadline heap, and a cancel scope more per channel: docs/scale.md)."""

    def __init__(self, grace_s: float, idle_s: float) -> None:
        self._open: dict[trio.CancelScope, HiveLink] = {}
        self.closed = False
        self.grace_s = grace_s
        """``http.shutdown_grace_s``: the most a channel's closing frame may take to send."""
        self.idle_s = idle_s
        """``http.keep_alive_timeout_s``: a channel with no frame for this long is closed (a
        hive sends one every interval; one that vanished without a word, power or network,
        would hold its channel forever)."""

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self.closed = True
        for scope in self._open:
            scope.cancel()

    async def reap(self) -> None:
        """Close the channels silent for ``idle_s`` (not one whose frame is being answered: the
        answer is not bounded by the hive's silence), looking every quarter of it: a channel
        goes between ``idle_s`` and 1.25 times it after its last frame."""
        async for now in every(self.idle_s / 4):
            heard_by = now - self.idle_s
            for scope, link in self._open.items():
                if link.heard_at < heard_by:
                    link.idle = True
                    scope.cancel()

    def opened(self, scope: trio.CancelScope, link: HiveLink) -> None:
        """A channel's session begins: ``scope`` is cancelled to end it."""
        link.heard_at = trio.current_time()
        self._open[scope] = link

    def gone(self, scope: trio.CancelScope) -> None:
        del self._open[scope]

    async def farewell(self, websocket: MessageSocket, link: HiveLink) -> None:
        """The closing frame of a session ended here: 1000 when its hive fell silent, 1001
        (going away) when the queen stops."""
        code, reason = ((1000, f"no frame for http.keep_alive_timeout_s ({self.idle_s:g}s)")
                        if link.idle and not self.closed else (1001, "the queen is stopping"))
        with trio.move_on_after(self.grace_s):
            await websocket.close(code, reason)


class ChannelService:
    """The channel's sessions, on either server: the connection's own WebSocket
    (``rbee/http/rawchannel.py``, every upgrade it can take) and hypercorn's with Starlette's
    ``WebSocket`` (``route``: whatever the connection leaves to the app). Both run ``serve``,
    so a hive cannot tell them apart but by the cost."""

    def __init__(self, config: QueenConfig, ingest: Ingest, authenticate: Authenticate,
                 metrics: QueenMetrics, open_channels: OpenChannels,
                 hub: ChannelHub | None = None) -> None:
        self.config, self.ingest, self.authenticate = config, ingest, authenticate
        self.metrics, self.open_channels = metrics, open_channels
        self.hub = hub if ingest.synchronous else None
        """Where plain channels wait and are answered (None: each by its own task)."""
        self.max_message_bytes = WS_MESSAGE_BODIES * config.http.max_body_bytes
        """As hypercorn buffers: a frame somewhat over ``http.max_body_bytes`` gets a clear 413,
        a bigger one closes the channel (1009) unread."""

    def admit(self, head: object) -> str | None:
        """The hive the caller may act as; ApiError for any upgrade the app is to answer
        (the channel off: 403; a refused caller: 401, counted there)."""
        if not self.config.channel_enabled:
            raise ApiError(403, "the channel is off (channel_enabled: false)")
        return self.authenticate(head)

    async def serve(self, socket: MessageSocket, acting_as: str | None) -> None:
        """Frames in order, one answer each: the next frame is read once this one is answered,
        so a hive that sends faster than the queen takes is held back by TCP, never queued
        here. One coroutine and one cancel scope a channel while it waits (10,000 channels
        wait at once: docs/scale.md); parked in the hub (``ChannelHub.park``) when it can take
        the channel, this task answering what the hub hands back."""
        metrics, channels, hub = self.metrics, self.open_channels, self.hub
        link = HiveLink(self.ingest, acting_as, self.config.http.max_body_bytes, metrics)
        metrics.channels.inc()
        try:
            with trio.CancelScope() as scope:  # OpenChannels: the queen stops, or silence
                channels.opened(scope, link)
                try:
                    while not channels.closed:
                        if hub is not None and hub.can_take(socket):
                            back, unsent = await hub.park(socket, link)
                            if back is Back.GONE:
                                return
                            if back is Back.WRITE:
                                link.heard_at = math.inf
                                if not await socket.send_framed(unsent):
                                    return
                                link.heard_at = trio.current_time()
                                continue
                            # Back.FRAME: that one message on this task's path, then back
                        data = await socket.receive()
                        if data is None:
                            return
                        link.heard_at = math.inf  # not closed as idle while it is answered
                        await _answer(socket, link, data)
                        del data  # not held through the wait for the next: 5 KB a hive
                        link.heard_at = trio.current_time()
                finally:
                    channels.gone(scope)
            await channels.farewell(socket, link)
        finally:
            metrics.channels.dec()

    def route(self) -> WebSocketRoute:
        """The app's route (``paths.CHANNEL``), or one that refuses every upgrade (403, as an
        old queen without the route does) with ``channel_enabled: false``: the hives then POST."""

        async def channel(websocket: WebSocket) -> None:
            if not self.config.channel_enabled:
                await websocket.close()  # the server answers the upgrade 403
                return
            try:
                acting_as = self.authenticate(_Upgrade(websocket))
            except ApiError as exc:
                self.metrics.refusal(exc.status_code)
                await websocket.send_denial_response(JsonResponse(
                    Reply(status="error", message=exc.message), status_code=exc.status_code,
                    headers=exc.headers))
                return
            await websocket.accept()
            try:
                await self.serve(_AsgiSocket(websocket), acting_as)
            except WebSocketDisconnect:
                pass

        return WebSocketRoute(paths.CHANNEL, channel)


class _AsgiSocket:
    """Starlette's ``WebSocket`` as a ``MessageSocket``."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.send_bytes = websocket.send_bytes

    async def receive(self) -> bytes | str | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        return data if data is not None else message.get("text") or ""

    async def close(self, code: int, reason: str) -> None:
        await self.websocket.close(code=code, reason=reason)


async def _answer(websocket: MessageSocket, link: HiveLink, data: bytes | str) -> None:
    started = time.perf_counter()
    if type(data) is str:
        answer: QueenFrame = ChannelError(status=400, message=(
            "a text frame: the channel takes binary frames of msgpack "
            "(rbee/contract/channel.py)"))
    else:
        answer = await link.take(data)
    link.counted(answer, started)
    await websocket.send_bytes(encode_frame(answer))
