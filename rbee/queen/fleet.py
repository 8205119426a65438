"""The queen's fleet, built in one place: its registry (what the queen reads), its broadcaster
(the live stream), and its store (where heartbeats go, which gives every event its id and keeps
the last ones for resuming clients).

The parts are made in the order they need each other, and none points back: the registry first
(on the store's clock), the broadcaster over the registry's snapshots, the store last with both.
A stream client's replay is the store, handed to ``Broadcaster.stream`` per client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..config import QueenConfig
from .broadcast import Broadcaster, Direct
from .registry import HiveRegistry
from .store import FleetStore, MemoryStore
from .streamfilter import PLAIN, StreamFilter


@dataclass(frozen=True, slots=True)
class Fleet:
    registry: HiveRegistry
    broadcaster: Broadcaster
    store: FleetStore

    def stream(self, last_event_id: str | None = None, stream_filter: StreamFilter = PLAIN,
               direct: Direct | None = None) -> AsyncIterator[bytes]:
        """One SSE client's stream (``Broadcaster.stream`` with this fleet's store as replay)."""
        return self.broadcaster.stream(self.store, last_event_id, stream_filter, direct)


def open_fleet(config: QueenConfig, clock: Callable[[], float] = time.monotonic) -> Fleet:
    """The fleet of a queen: the store ``registry.store.kind`` names, with its registry and
    broadcaster. The memory store's registry runs on ``clock`` (``trio.current_time`` makes its
    silences follow a test's MockClock); a shared store's on Redis's."""
    if config.registry.store.kind == "redis":
        from .redis.store import RedisClock, RedisStore  # its client library loads only if used

        clock = RedisClock()
        registry, broadcaster = _views(config, clock.now)
        return Fleet(registry, broadcaster, RedisStore(config, registry, broadcaster, clock))
    registry, broadcaster = _views(config, clock)
    return Fleet(registry, broadcaster, MemoryStore(config, registry, broadcaster))


def _views(config: QueenConfig, clock: Callable[[], float]) -> tuple[HiveRegistry, Broadcaster]:
    registry = HiveRegistry(config.registry, clock=clock)
    stream = config.stream
    broadcaster = Broadcaster(client_buffer=stream.client_buffer, max_clients=stream.max_clients,
                              snapshot=registry.snapshot,
                              client_buffer_bytes=stream.client_buffer_bytes,
                              write_chunk_bytes=stream.write_chunk_bytes)
    return registry, broadcaster
