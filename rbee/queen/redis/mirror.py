"""A queen's mirror of the shared fleet: loaded from Redis at start, then following the Redis
Stream, each entry applied once, in id order per hive, and handed to this queen's clients."""

from __future__ import annotations

import logging

import msgspec
import trio

from ..._errors import StoreError
from ...config import QueenConfig
from ...contract import HiveHeartbeat, HiveRemovedEvent, HiveStaleEvent, StreamEvent, decode_stream_event
from ..broadcast import Broadcaster
from ..registry import HiveRegistry
from ..store import telemetry_event
from .connection import RedisConnection, pairs
from .keys import EntryKey, entry_key, text

log = logging.getLogger(__name__)

HEARTBEAT_DECODER = msgspec.json.Decoder(HiveHeartbeat)
FOLLOW_BATCH_S = 0.005
"""After a read, the follower lets entries gather this long: under load one ``XREAD`` (about
300 us of the client's CPU) then brings many, at the cost of at most this much latency."""


def fields_of(fields) -> dict[bytes, bytes]:
    """An entry's fields as glide returns them: pairs, or a flat list."""
    if fields and isinstance(fields[0], list):
        return {k: v for k, v in fields}
    return dict(pairs(fields))


class Mirror:
    def __init__(self, config: QueenConfig, redis: RedisConnection, registry: HiveRegistry,
                 broadcaster: Broadcaster) -> None:
        self.config = config
        self.redis = redis
        self.registry = registry
        self.broadcaster = broadcaster
        self.position = "0-0"
        """The id of the last entry applied (and handed to the broadcaster)."""
        self.advanced = trio.Event()
        """Set (and replaced) whenever ``position`` moves on."""
        self._applied: dict[str, EntryKey] = {}
        """Per hive, the newest entry its mirror record comes from."""
        self.own: dict[str, HiveHeartbeat] = {}
        """Heartbeats this queen wrote, by entry id, until its follower reads them back."""

    async def load(self) -> None:
        """Replace the mirror with the fleet as Redis holds it, as of one stream entry."""
        last_id, hives, seen, stale = await self.redis.eval("SNAPSHOT")
        seen_ms = {text(hive): int(score) for hive, score in pairs(seen)}
        stale_set = {text(hive) for hive in stale}
        self.registry.clear()
        self._applied.clear()
        self.own.clear()
        for hive, data in pairs(hives):
            hive_id = text(hive)
            received_ms = seen_ms.get(hive_id, 0)
            self.registry.update_hive(HEARTBEAT_DECODER.decode(data), received_ms / 1000,
                                      stale=hive_id in stale_set, admit=False)
            self._applied[hive_id] = (received_ms, -1)
        self.position = text(last_id)
        self._advance()

    def wrote(self, entry_id: str, heartbeat: HiveHeartbeat) -> None:
        """A heartbeat this queen wrote as ``entry_id``: applied at once (the queen reads what it
        wrote), and kept until the follower reads it back, so it is not decoded again."""
        if len(self.own) > 1000:  # the follower is not reading them back (Redis lost)
            self.own.clear()
        if (entry_key(entry_id) or (0, 0)) > (entry_key(self.position) or (0, 0)):
            self.own[entry_id] = heartbeat  # else the follower has read it already
        self.apply_heartbeat(entry_id, heartbeat)

    def apply_heartbeat(self, entry_id: str, heartbeat: HiveHeartbeat) -> None:
        key = entry_key(entry_id)
        assert key is not None
        hive_id = heartbeat.hive.id
        if self._applied.get(hive_id, (0, -1)) >= key:
            return  # the mirror already has this or a newer one
        self._applied[hive_id] = key
        self.registry.update_hive(heartbeat, key[0] / 1000, admit=False)

    def apply_event(self, entry_id: str, event: StreamEvent) -> None:
        key = entry_key(entry_id)
        assert key is not None
        if isinstance(event, HiveRemovedEvent):
            if self._applied.get(event.hive_id, (0, -1)) < key:
                self._applied[event.hive_id] = key
                self.registry.remove_hive(event.hive_id)
        elif (isinstance(event, HiveStaleEvent)
              and self._applied.get(event.hive_id, (0, -1)) < key):
            self.registry.mark_stale(event.hive_id)

    def event_of(self, entry_id: str, fields: dict[bytes, bytes]) -> StreamEvent | bytes:
        """An entry's event: a heartbeat's as the stream tells it, or the JSON as stored."""
        if fields[b"k"] == b"hb":
            return telemetry_event(self.own.get(entry_id)
                                   or HEARTBEAT_DECODER.decode(fields[b"d"]),
                                   self.config.registry)
        return fields[b"d"]

    def _on_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """One entry read from the stream: into the mirror, then to this queen's clients."""
        data = fields[b"d"]
        if fields[b"k"] == b"hb":
            heartbeat = self.own.pop(entry_id, None) or HEARTBEAT_DECODER.decode(data)
            self.apply_heartbeat(entry_id, heartbeat)
            event: StreamEvent | bytes = telemetry_event(heartbeat, self.config.registry)
        else:
            event = data
            if b'"hive_removed"' in data or b'"hive_stale"' in data:
                self.apply_event(entry_id, decode_stream_event(data))
        self.position = entry_id
        self.broadcaster.publish(event, entry_id)

    def _advance(self) -> None:
        self.advanced.set()
        self.advanced = trio.Event()

    async def follow(self) -> None:
        """Read the stream after the mirror's position, forever; after losing Redis, go on from
        there if Redis still has that entry, else reload the mirror and resync the clients."""
        redis = self.redis
        block_ms = str(max(1, int(redis.settings.request_timeout_s * 500)))
        lost = False
        while True:
            try:
                if lost:
                    await self._resume()
                    lost = False
                reply = await redis.command("XREAD", "COUNT", "1000", "BLOCK", block_ms,
                                            "STREAMS", redis.keys.stream, self.position,
                                            reader=True)
                redis.ok("stream")
            except StoreError as exc:
                redis.failed("stream", exc)
                lost = True
                await trio.sleep(min(1.0, redis.settings.lease_s / 3))
                continue
            if not reply:
                continue
            for entry_id, fields in next(iter(reply.values())).items():
                self._on_entry(text(entry_id), fields_of(fields))
            self._advance()
            await trio.sleep(FOLLOW_BATCH_S)

    async def _resume(self) -> None:
        reply = await self.redis.command("XRANGE", self.redis.keys.stream, self.position,
                                         self.position, reader=True)
        if reply:
            return
        log.warning("Redis no longer holds stream entry %s (restarted empty?): reloading the "
                    "fleet and sending every stream client a snapshot", self.position)
        await self.load()
        self.broadcaster.resync_all(self.position)
