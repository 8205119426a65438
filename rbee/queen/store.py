"""Where the queen keeps the fleet and its stream: one interface, two stores.

``memory`` (the default) keeps both in this queen: ``rbee up`` and small fleets need nothing else.
``redis`` (``rbee/queen/redis/``) keeps them in a Redis server that several queens share,
so any queen takes any hive's heartbeat and every queen serves the whole fleet.

Either way the queen reads the fleet from its own ``HiveRegistry`` (scheduling queries, snapshots,
``/metrics``, history): with memory it is the fleet itself, with redis a mirror that follows the
shared stream. Every event on the stream has an id that only increases, and a store keeps the last
``stream.replay_events`` of them, so a client that reconnects with ``Last-Event-ID`` gets exactly
the events it missed (``missed``) instead of a snapshot.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

from .._errors import RbeeError
from ..contract import (
    ChannelDelta,
    HiveHeartbeat,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    StreamEvent,
    encode,
)
from .broadcast import Broadcaster, Replay
from .registry import HiveRegistry
from .scheduling import idle_instances
from .summary import FleetTotals
from .ticks import every

if TYPE_CHECKING:
    from ..config import QueenConfig, RegistrySettings

log = logging.getLogger(__name__)


class StoreHealth(msgspec.Struct, kw_only=True, frozen=True):
    """A store's own report for the queen's ``/health``."""

    kind: str
    problem: str | None = None
    """Why the store is degraded, or None while it works."""
    sweeping: bool | None = None
    """With a shared store: whether this queen holds the sweeper's lease (None: always)."""


class BaseMissing(RbeeError):
    """A channel's delta the store cannot take: it holds no record of the hive the delta applies
    to (a shared store's hive removed, or the store restarted empty). The hive sends a snapshot."""


class FleetStore(Replay, Protocol):
    """What the queen's API and its stream need of a store (and, as a ``Replay``, what a
    resuming stream client needs)."""

    def health(self) -> StoreHealth: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The store's background work (sweeps, the summary, following the stream), until
        cancelled; ``started`` once the registry holds the fleet."""

    async def ingest(self, heartbeat: HiveHeartbeat, size: int | None = None,
                     delta: ChannelDelta | None = None) -> None:
        """Store one heartbeat and announce it; raises StoreError when it cannot be stored.
        ``size``: the bytes of its JSON, when the caller has them. ``delta``: what a hive's
        channel sent, ``heartbeat`` being what it made of the hive's last one (a shared store
        passes the delta on to the other queens; raises BaseMissing when it cannot)."""

    async def remove(self, hive_id: str, reason: str) -> HiveRemovedEvent | None:
        """Remove a hive and announce it; None for a hive the store does not know."""


def log_verdict(event: HiveStaleEvent | HiveRemovedEvent) -> None:
    if isinstance(event, HiveStaleEvent):
        log.warning("hive %r is stale: silent for %.1fs", event.hive_id, event.silent_s)
    else:
        log.warning("hive %r removed with %d workers: %s", event.hive_id,
                    len(event.worker_ids), event.reason)


def telemetry_event(heartbeat: HiveHeartbeat, settings: RegistrySettings) -> HiveTelemetryEvent:
    """What the stream says of a heartbeat: the hive's report, and which of its workers the
    queen judges idle."""
    return HiveTelemetryEvent(hive_id=heartbeat.hive.id, timestamp=heartbeat.timestamp,
                              workers=heartbeat.workers, capabilities=heartbeat.capabilities,
                              health_status=heartbeat.hive.health_status,
                              idle=idle_instances(heartbeat, settings))


class MemoryStore:
    """The fleet in this queen alone: the registry itself, sweeps on its own clock, and the
    last events kept as structs (never mutated) for resuming clients. Event ids count up from
    the queen's start time in microseconds, so they also increase across its restarts."""

    def __init__(self, config: QueenConfig, registry: HiveRegistry,
                 broadcaster: Broadcaster) -> None:
        self.config = config
        self.registry = registry
        self.broadcaster = broadcaster
        self.totals = FleetTotals(config.registry, registry.hive_ids)
        registry.observe(self.totals.hive_changed)
        start = int(time.time() * 1e6)
        self._ids = itertools.count(start)
        self._last = start - 1
        self._kept: deque[tuple[int, StreamEvent | bytes | HiveHeartbeat, int]] = deque()
        self._kept_bytes = 0
        """The JSON size of the kept events: bounded by ``stream.replay_bytes`` as their count
        is by ``stream.replay_events``, so one hive's big heartbeats cannot pin a thousand
        times ``http.max_body_bytes``."""

    @property
    def position(self) -> str:
        return str(self._last)

    def health(self) -> StoreHealth:
        return StoreHealth(kind="memory")

    def publish(self, event: StreamEvent | bytes | HiveHeartbeat, size: int | None = None
                ) -> None:
        """Announce ``event`` (a struct, or its JSON: the fleet summary) and keep it for
        resuming clients. ``size``, its JSON's bytes, is measured here when not given (sweeps
        only: a heartbeat brings its body's).

        A heartbeat stands for its ``hive_telemetry`` event, built once, when first read: at
        once when a client listens (and kept built), else only if a resuming client asks for it
        (``missed``). The event is a function of the heartbeat alone (never mutated once stored)
        and the settings, so it is the same either way; building it for every heartbeat nobody
        reads cost about 5 µs of the ~25 µs a heartbeat's store write takes (docs/scale.md)."""
        self._last = next(self._ids)
        listening = self.broadcaster.client_count
        if listening or size is None:
            event = self._event(event)
        if size is None:
            size = len(event) if isinstance(event, bytes) else len(encode(event))
        kept, stream = self._kept, self.config.stream
        kept.append((self._last, event, size))
        self._kept_bytes += size
        while kept and (len(kept) > stream.replay_events
                        or self._kept_bytes > stream.replay_bytes):
            self._kept_bytes -= kept.popleft()[2]
        if listening:
            self.broadcaster.publish(event, str(self._last))

    def _event(self, kept: StreamEvent | bytes | HiveHeartbeat) -> StreamEvent | bytes:
        if type(kept) is HiveHeartbeat:
            return telemetry_event(kept, self.config.registry)
        return kept

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._summary_loop)
            task_status.started()
            async for _ in every(self.config.registry.cleanup_interval_s):
                result = self.registry.sweep()
                for event in [*result.stale, *result.removed]:
                    log_verdict(event)
                    self.publish(event)

    async def _summary_loop(self) -> None:
        """The fleet summary every ``stream.queen_interval_s`` while a client listens. It is
        for listeners alone: with none, none is made (each hive's share is computed again at
        each summary once it has reported, 7 % of a queen's core at 3,200 channel hives:
        docs/scale.md). The changes noted meanwhile are kept, one per hive, so the first
        summary a client gets is the fleet as it is then, and a client resuming over a quiet
        spell misses no summary: there was none."""
        async for _ in every(self.config.stream.queen_interval_s):
            if self.broadcaster.client_count:
                self.publish(await self.totals.event())

    async def ingest(self, heartbeat: HiveHeartbeat, size: int | None = None,
                     delta: ChannelDelta | None = None) -> None:
        self.ingest_now(heartbeat, size)

    def ingest_now(self, heartbeat: HiveHeartbeat, size: int | None = None) -> None:
        """``ingest``, which never waits here: no other queen needs to hear of it (nor of a
        delta: the whole heartbeat is stored)."""
        self.registry.update_hive(heartbeat)
        self.publish(heartbeat, size)

    async def remove(self, hive_id: str, reason: str) -> HiveRemovedEvent | None:
        return self.remove_now(hive_id, reason)

    def remove_now(self, hive_id: str, reason: str) -> HiveRemovedEvent | None:
        event = self.registry.remove_hive(hive_id, reason)
        if event is not None:
            self.publish(event)
        return event

    async def missed(self, last_id: str, upto: str
                     ) -> list[tuple[str, StreamEvent | bytes]] | None:
        try:
            last, end = int(last_id), int(upto)
        except ValueError:
            return None
        if last == end:
            return []
        kept = self._kept
        if not kept or not kept[0][0] <= last + 1 <= end or end > kept[-1][0]:
            return None
        first = last + 1 - kept[0][0]  # ids are consecutive within one run
        return [(str(n), self._event(event))
                for n, event, _ in itertools.islice(kept, first, None) if n <= end]

    async def caught_up(self, event_id: str) -> None:
        return None  # this queen is the only one: it has published everything it has
