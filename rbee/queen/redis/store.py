"""The redis store: the ``FleetStore`` of a fleet shared by several queens (the package's
docstring tells how), made of a connection, a mirror and a sweeper."""

from __future__ import annotations

import msgspec
import trio

from ..._errors import StoreError
from ...config import QueenConfig
from ...contract import (
    ChannelDelta,
    HiveHeartbeat,
    HiveRemovedEvent,
    StreamEvent,
    encode,
    encode_frame,
    utc_now,
    worker_id,
)
from ..broadcast import Broadcaster
from ..registry import HiveRegistry
from ..store import BaseMissing, StoreHealth
from .connection import RedisClock, RedisConnection
from .keys import entry_key, text
from .mirror import Mirror, fields_of
from .sweeper import Sweeper
from .writes import DELTA, WHOLE, HeartbeatWrites

_records = msgspec.msgpack.Encoder()

CATCH_UP_WAIT_S = 1.0
"""How long a resuming client waits for this queen to reach the id it last got elsewhere."""


def as_entries(reply) -> list[tuple]:
    """Stream entries as glide returns them (a dict, or pairs) as (id, fields) pairs."""
    return list(reply.items()) if isinstance(reply, dict) else [tuple(e) for e in reply]


class RedisStore:
    def __init__(self, config: QueenConfig, registry: HiveRegistry, broadcaster: Broadcaster,
                 clock: RedisClock) -> None:
        """``registry`` runs on ``clock`` (Redis's), which the sweeper keeps in sync."""
        self.registry = registry
        self.redis = RedisConnection(config.registry.store)
        self.maxlen = str(config.stream.replay_events)
        self.mirror = Mirror(config, self.redis, registry, broadcaster)
        self.writes = HeartbeatWrites(self.redis, self.maxlen)
        self.sweeper = Sweeper(config, self.redis, registry, clock)

    @property
    def position(self) -> str:
        return self.mirror.position

    def health(self) -> StoreHealth:
        return StoreHealth(kind="redis", problem=self.redis.problem,
                           sweeping=self.sweeper.sweeping)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        try:
            await self.redis.open()
            await self.mirror.load()
            await self.sweeper.lease_tick()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.mirror.follow)
                nursery.start_soon(self.writes.run)
                nursery.start_soon(self.sweeper.keep_lease)
                nursery.start_soon(self.sweeper.sweep_loop)
                nursery.start_soon(self.sweeper.summary_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.sweeper.release()
                await self.redis.close()

    async def ingest(self, heartbeat: HiveHeartbeat, size: int | None = None,
                     delta: ChannelDelta | None = None) -> None:
        """A whole heartbeat replaces the hive's record in Redis; with ``delta`` (what a channel
        sent, ``heartbeat`` being what it made of the hive's last one) only the delta goes on
        the stream, for the other queens' mirrors to apply the same."""
        # size: unused, Redis trims its Stream by count (MAXLEN ~ stream.replay_events)
        # the registry's admission rules (max_hives, new_hives_per_s) against this queen's
        # mirror of the fleet: the cap is fleet-wide, the rate per queen
        hive_id = heartbeat.hive.id
        self.registry.admit(hive_id)
        if delta is None:
            entry_id = await self.writes.write(hive_id, WHOLE, _records.encode(heartbeat))
        else:
            entry_id = await self.writes.write(hive_id, DELTA, encode_frame(delta))
            if entry_id is None:
                raise BaseMissing(f"the registry store holds no record of hive {hive_id!r} "
                                  f"(removed, or Redis restarted empty): a delta needs its "
                                  f"snapshot first")
        self.mirror.wrote(entry_id, heartbeat, delta is None)

    async def remove(self, hive_id: str, reason: str) -> HiveRemovedEvent | None:
        event = HiveRemovedEvent(hive_id=hive_id, reason=reason, timestamp=utc_now(),
                                 worker_ids=[worker_id(hive_id, w)
                                             for w in self.registry.get_workers(hive_id)])
        entry_id = await self.redis.eval("REMOVE", hive_id, encode(event), self.maxlen)
        if entry_id is None:
            return None
        self.mirror.apply_event(text(entry_id), event)
        return event

    async def missed(self, last_id: str, upto: str
                     ) -> list[tuple[str, StreamEvent | bytes]] | None:
        last, end = entry_key(last_id), entry_key(upto)
        if last is None or end is None or last > end:
            return None
        if last == end:
            return []
        count = int(self.maxlen) * 2 + 200  # MAXLEN ~ keeps up to a node (100) more
        try:
            reply = await self.redis.command("XRANGE", self.redis.keys.stream, last_id, upto,
                                             "COUNT", str(count))
        except StoreError:
            return None  # a snapshot from the mirror then
        entries = as_entries(reply)
        if not entries or text(entries[0][0]) != last_id:
            return None  # trimmed away, or not an id of this stream
        if len(entries) == count and text(entries[-1][0]) != upto:
            return None  # more missed than kept: never a gap
        missed = [(text(entry_id), fields_of(fields)) for entry_id, fields in entries]
        events, unknown = self.mirror.replay(missed, 1)
        if unknown:  # deltas of hives whose last whole heartbeat came before last_id
            try:
                earlier = await self.redis.command("XREVRANGE", self.redis.keys.stream,
                                                   f"({last_id}", "-", "COUNT", self.maxlen)
            except StoreError:
                return None
            before = [(text(entry_id), fields_of(fields))
                      for entry_id, fields in reversed(as_entries(earlier))]
            events, unknown = self.mirror.replay(before + missed, len(before) + 1)
        return None if unknown else events

    async def caught_up(self, event_id: str) -> None:
        target = entry_key(event_id)
        if target is None:
            return
        with trio.move_on_after(CATCH_UP_WAIT_S):
            while (entry_key(self.mirror.position) or (0, 0)) < target:
                await self.mirror.advanced.wait()
