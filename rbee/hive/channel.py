"""The hive's end of its channel: one WebSocket to the queen, a snapshot, then only what changed.

httpx-ws runs the WebSocket over the hive's own httpx client, so the channel has the POST's
settings without repeating them: TLS and its CA file, the credential or token header, the connect
timeout for the upgrade. Frames are built by ``FrameMaker``: it remembers the encoded bytes of each
worker, GPU and the hive's info as last sent, and a delta carries what differs (bytes compared, so
a record changed in place is still seen).

Backpressure: at most ``heartbeat.max_unacked`` frames are sent and not yet answered. While the
window is full the hive sends nothing; when it opens, it sends its newest state as one frame (a
delta from the last frame sent), so a hive that is behind coalesces and never queues. A frame
unanswered for ``read_timeout_s`` ends the channel (the queen is gone or stuck).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx
import msgspec
import trio
from httpx_ws import AsyncWebSocketSession as WebSocket
from httpx_ws import HTTPXWSException, WebSocketUpgradeError, aconnect_ws

from .._errors import ContractError
from ..config import HeartbeatSettings
from ..contract import (
    ChannelAck,
    ChannelDelta,
    ChannelError,
    ChannelSnapshot,
    HiveHeartbeat,
    decode_queen_frame,
    encode_frame,
    paths,
    worker_key,
)

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
BUSY = (429, 503)
"""Upgrade or frame statuses that mean "later, maybe elsewhere", not "no channel here"."""


class HeartbeatSource(Protocol):
    """What a sender needs of the hive agent: its latest snapshot, and a wait for a newer one."""

    generation: int
    latest: HiveHeartbeat

    async def wait_newer(self, generation: int) -> tuple[int, HiveHeartbeat]: ...


class Delivery(Protocol):
    """Where the channel reports each heartbeat's fate (the sender's ``DeliveryState``)."""

    def delivered(self) -> None: ...

    def failed(self, problem: str) -> bool: ...


@dataclass
class Ended:
    """Why a channel ended (or never opened)."""

    problem: str
    refused: bool = False
    """The queen answered the upgrade with a status other than 101, 429 or 503: it has no
    channel (an older queen, or one with ``channel_enabled: false``)."""
    retry_after_s: float | None = None
    reported: bool = False
    """The problem was already reported to the ``Delivery`` (a refused frame)."""


class FrameMaker:
    """The channel's frames: a snapshot when asked, else a delta from the last frame sent."""

    def __init__(self) -> None:
        self.seq = -1
        self.snapshot_seq = -1
        self._hive = b""
        self._workers: dict[tuple[str, str], bytes] = {}
        self._gpus: dict[str, bytes] = {}

    def frame(self, heartbeat: HiveHeartbeat, snapshot: bool) -> bytes:
        self.seq += 1
        hive = _encode(heartbeat.hive)
        workers = {worker_key(w): _encode(w) for w in heartbeat.workers}
        gpus = {g.uuid: _encode(g) for g in heartbeat.capabilities}
        delta = None
        if not snapshot and len(workers) == len(heartbeat.workers) \
                and len(gpus) == len(heartbeat.capabilities):
            delta = self._delta(heartbeat, hive, workers, gpus)
        self._hive, self._workers, self._gpus = hive, workers, gpus
        if delta is None:
            self.snapshot_seq = self.seq
            return encode_frame(ChannelSnapshot(seq=self.seq, heartbeat=heartbeat))
        return encode_frame(delta)

    def _delta(self, heartbeat: HiveHeartbeat, hive: bytes, workers: dict, gpus: dict
               ) -> ChannelDelta | None:
        """The delta, or None when the lists' order is not what appending new items gives."""
        before_w, before_g = self._workers, self._gpus
        if (list(workers) != _kept_then_new(before_w, workers)
                or list(gpus) != _kept_then_new(before_g, gpus)):
            return None
        return ChannelDelta(
            seq=self.seq, timestamp=heartbeat.timestamp,
            hive=heartbeat.hive if hive != self._hive else None,
            workers=[w for w, key in zip(heartbeat.workers, workers, strict=True)
                     if before_w.get(key) != workers[key]],
            gone=[key for key in before_w if key not in workers],
            gpus=[g for g in heartbeat.capabilities if before_g.get(g.uuid) != gpus[g.uuid]],
            gpus_gone=[uuid for uuid in before_g if uuid not in gpus])


def _kept_then_new(before: dict, now: dict) -> list:
    return [key for key in before if key in now] + [key for key in now if key not in before]


def channel_url(queen_url: httpx.URL) -> str:
    return str(queen_url.copy_with(path=queen_url.path.rstrip("/") + paths.CHANNEL))


class Channel:
    """One channel to one queen, from the upgrade until it ends; ``run`` returns why."""

    def __init__(self, settings: HeartbeatSettings, source: HeartbeatSource,
                 delivery: Delivery, clock: Callable[[], float] = trio.current_time) -> None:
        self.settings, self.source, self.delivery = settings, source, delivery
        self.maker = FrameMaker()
        self._unanswered: deque[tuple[int, float]] = deque()
        self._window_open = trio.Event()
        self._need_snapshot = True
        self._snapshot_at = -math.inf
        self._waiting = trio.CancelScope()
        """The wait for the queen's next frame, until the oldest unanswered frame's deadline."""
        self.open = False
        """Upgraded and not ended: the hive's engine poll pushes changes at once while it is."""

    async def run(self, client: httpx.AsyncClient, queen_url: httpx.URL) -> Ended:
        ended: Ended | None = None
        try:
            async with aconnect_ws(channel_url(queen_url), client,
                                   keepalive_ping_interval_seconds=None) as websocket:
                self.open = True
                try:
                    ended = await self._exchange(websocket)
                finally:
                    self.open = False
        except* WebSocketUpgradeError as group:
            ended = _refusal(group.exceptions[0].response)
        except* httpx.TimeoutException as group:
            ended = ended or Ended(f"timed out ({type(group.exceptions[0]).__name__})")
        except* (httpx.TransportError, HTTPXWSException, OSError) as group:
            first = group.exceptions[0]  # the same words as a POST's failure
            ended = ended or Ended(f"{type(first).__name__}: {first}".rstrip(": "))
        assert ended is not None
        return ended

    async def _exchange(self, websocket: WebSocket) -> Ended:
        """Send and hear until either side ends the channel; the first problem is returned."""
        ended: list[Ended] = []

        async def until_ended(part, nursery: trio.Nursery) -> None:
            try:
                ended.append(await part(websocket))
            except HTTPXWSException as exc:
                ended.append(Ended(f"channel lost: {type(exc).__name__}: {exc}".rstrip(": ")))
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_ended, self._send, nursery)
            nursery.start_soon(until_ended, self._hear, nursery)
        return ended[0]

    async def _send(self, websocket: WebSocket) -> Ended:
        settings, source = self.settings, self.source
        generation, heartbeat = await source.wait_newer(0)  # the first collected, or newer
        while True:
            while len(self._unanswered) >= settings.max_unacked:
                self._window_open = trio.Event()
                await self._window_open.wait()
            if source.generation > generation:  # newer ones came while the window was shut
                generation, heartbeat = source.generation, source.latest
            now = trio.current_time()
            snapshot = self._need_snapshot or now - self._snapshot_at >= settings.snapshot_every_s
            data = self.maker.frame(heartbeat, snapshot)
            if snapshot:
                self._need_snapshot, self._snapshot_at = False, now
            with trio.move_on_after(settings.write_timeout_s) as sending:
                await websocket.send_bytes(data)
            if sending.cancelled_caught:
                return Ended("channel: a frame took longer than write_timeout_s to send")
            self._unanswered.append((self.maker.seq, now))
            if len(self._unanswered) == 1:  # the first frame awaited: its answer has a deadline
                self._waiting.deadline = now + settings.read_timeout_s
            generation, heartbeat = await source.wait_newer(generation)

    async def _hear(self, websocket: WebSocket) -> Ended:
        settings, delivery = self.settings, self.delivery
        while True:
            deadline = (self._unanswered[0][1] + settings.read_timeout_s if self._unanswered
                        else math.inf)
            with trio.move_on_at(deadline) as self._waiting:
                data = await websocket.receive_bytes()
            if self._waiting.cancelled_caught:
                return Ended(f"channel: no answer to frame {self._unanswered[0][0]} within "
                             f"read_timeout_s ({settings.read_timeout_s}s)")
            try:
                frame = decode_queen_frame(data)
            except ContractError as exc:
                return Ended(f"channel: the queen sent {exc}")
            if self._unanswered:
                self._unanswered.popleft()
                self._window_open.set()
            if type(frame) is ChannelAck:
                delivery.delivered()
                continue
            if frame.seq is None or frame.seq > self.maker.snapshot_seq:
                self._need_snapshot = True  # else a snapshot already followed it
            if type(frame) is ChannelError:
                problem = f"HTTP {frame.status}: {frame.message}"
                delivery.failed(problem)
                if frame.status in BUSY:
                    return Ended(problem, retry_after_s=frame.retry_after_s,
                                 reported=True)


def _refusal(response: httpx.Response) -> Ended:
    """Why the queen did not take the upgrade: busy (429/503, with its Retry-After), or no
    channel there at all (``refused``). Its body is gone with the upgrade's stream; a POST that
    follows gets the queen's words."""
    problem = f"channel refused: HTTP {response.status_code} to the upgrade"
    if response.status_code in BUSY:
        value = response.headers.get("retry-after", "")
        return Ended(problem, retry_after_s=float(value) if value.isdigit() else None)
    return Ended(problem, refused=True)
