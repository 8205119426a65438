"""A queen's mirror of the shared fleet: loaded from Redis at start, then following the Redis
Stream, each entry applied once, in id order per hive, and handed to this queen's clients.

A whole heartbeat's entry (``hb``) replaces the hive's copy; a channel's delta (``dl``) is applied
to the copy the mirror holds when that copy is the entry the delta names as its base (``b``), as
the queen that took it applied it to the same. A delta that does not follow (the mirror missed an
entry, or loaded the hive's record older than the delta's base) is not applied: the mirror reloads
the hive's record from Redis once, and waits for the hive's next whole heartbeat (a snapshot, within
``channel.snapshot_every_s``) if the record is not the base either.
"""

from __future__ import annotations

import logging

import msgspec
import trio

from ..._errors import ContractError, StoreError
from ...config import QueenConfig
from ...contract import (
    ChannelDelta,
    HiveHeartbeat,
    HiveRemovedEvent,
    HiveStaleEvent,
    StreamEvent,
    apply_delta,
    decode_stream_event,
)
from ..broadcast import Broadcaster
from ..registry import HiveRegistry
from ..store import telemetry_event
from .connection import RedisConnection, pairs
from .keys import EntryKey, entry_key, text

log = logging.getLogger(__name__)

RECORD_DECODER = msgspec.msgpack.Decoder(HiveHeartbeat)
JSON_RECORD_DECODER = msgspec.json.Decoder(HiveHeartbeat)
DELTA_DECODER = msgspec.msgpack.Decoder(ChannelDelta)
NONE: EntryKey = (0, -1)
FOLLOW_BATCH_S = 0.02
"""After a read, the follower lets entries gather this long: under load one ``XREAD`` (about
300 us of the client's CPU) then brings many, at the cost of at most this much latency
(a mirror, not this queen's own registry: that applies its own writes at once)."""

Entry = tuple[str, dict[bytes, bytes]]


def fields_of(fields) -> dict[bytes, bytes]:
    """An entry's fields as glide returns them: pairs, or a flat list."""
    if fields and isinstance(fields[0], list):
        return {k: v for k, v in fields}
    return dict(pairs(fields))


def decode_record(data: bytes) -> HiveHeartbeat:
    """A whole heartbeat as stored: msgpack, or JSON (``{``) as queens before deltas wrote it."""
    if data[:1] == b"{":
        return JSON_RECORD_DECODER.decode(data)
    return RECORD_DECODER.decode(data)


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
        self._bases: dict[str, HiveHeartbeat] = {}
        """Per hive, the whole heartbeat of that entry: what its next delta applies to."""
        self._reloaded: set[str] = set()
        """Hives whose record was (re)loaded since their last whole entry: a delta that does not
        follow then waits for the next whole one instead of reloading again."""
        self.own: dict[str, HiveHeartbeat] = {}
        """Heartbeats this queen wrote, by entry id, until its follower reads them back."""
        self.deltas_missed = 0
        """Deltas not applied: they did not follow what the mirror held, even reloaded."""
        self.reloads = 0
        """Records reloaded for a delta that did not follow."""

    async def load(self) -> None:
        """Replace the mirror with the fleet as Redis holds it, as of one stream entry."""
        last_id, hives, seen, stale, whole = await self.redis.eval("SNAPSHOT")
        seen_ms = {text(hive): int(score) for hive, score in pairs(seen)}
        whole_ids = {text(hive): entry_key(text(entry_id)) for hive, entry_id in pairs(whole)}
        stale_set = {text(hive) for hive in stale}
        self.registry.clear()
        self._applied.clear()
        self._bases.clear()
        self.own.clear()
        for hive, data in pairs(hives):
            hive_id = text(hive)
            received_ms = seen_ms.get(hive_id, 0)
            heartbeat = decode_record(data)
            self.registry.update_hive(heartbeat, received_ms / 1000,
                                      stale=hive_id in stale_set, admit=False)
            self._applied[hive_id] = whole_ids.get(hive_id) or (received_ms, -1)
            self._bases[hive_id] = heartbeat
        self._reloaded = set(self._bases)
        self.position = text(last_id)
        self._advance()

    def wrote(self, entry_id: str, heartbeat: HiveHeartbeat, whole: bool) -> None:
        """A heartbeat this queen wrote as ``entry_id``: applied at once (the queen reads what it
        wrote), and kept until the follower reads it back, so it is not decoded again."""
        if len(self.own) > 1000:  # the follower is not reading them back (Redis lost)
            self.own.clear()
        if (entry_key(entry_id) or (0, 0)) > (entry_key(self.position) or (0, 0)):
            self.own[entry_id] = heartbeat  # else the follower has read it already
        self.apply_heartbeat(entry_id, heartbeat, whole)

    def apply_heartbeat(self, entry_id: str, heartbeat: HiveHeartbeat, whole: bool) -> bool:
        """Into the mirror unless it holds this entry or a newer one; whether it went in."""
        key = entry_key(entry_id)
        assert key is not None
        hive_id = heartbeat.hive.id
        if whole:
            self._reloaded.discard(hive_id)
        if self._applied.get(hive_id, NONE) >= key:
            return False  # the mirror already has this or a newer one
        self._applied[hive_id] = key
        self._bases[hive_id] = heartbeat
        self.registry.update_hive(heartbeat, key[0] / 1000, admit=False)
        return True

    def apply_event(self, entry_id: str, event: StreamEvent) -> None:
        key = entry_key(entry_id)
        assert key is not None
        if isinstance(event, HiveRemovedEvent):
            if self._applied.get(event.hive_id, NONE) < key:
                self._applied[event.hive_id] = key
                self._bases.pop(event.hive_id, None)
                self._reloaded.discard(event.hive_id)
                self.registry.remove_hive(event.hive_id)
        elif (isinstance(event, HiveStaleEvent)
              and self._applied.get(event.hive_id, NONE) < key):
            self.registry.mark_stale(event.hive_id)

    def _followed(self, entry_id: str, fields: dict[bytes, bytes]) -> HiveHeartbeat | None:
        """The whole heartbeat a delta entry makes of the hive's copy, or None when the copy is
        not its base (or is newer than it)."""
        hive_id, key = text(fields[b"h"]), entry_key(entry_id)
        applied, base = self._applied.get(hive_id, NONE), self._bases.get(hive_id)
        if base is None or applied != entry_key(text(fields[b"b"])):
            return None
        try:
            heartbeat = apply_delta(base, DELTA_DECODER.decode(fields[b"d"]))
        except (msgspec.ValidationError, msgspec.DecodeError, ContractError) as exc:
            log.warning("stream entry %s: a delta of hive %r that does not apply: %s",
                        entry_id, hive_id, exc)
            return None
        assert key is not None
        self._applied[hive_id], self._bases[hive_id] = key, heartbeat
        self.registry.update_hive(heartbeat, key[0] / 1000, admit=False)
        return heartbeat

    def _on_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> str | None:
        """One entry read from the stream: into the mirror, then to this queen's clients. Returns
        the hive to reload when it is a delta that does not follow (and was not reloaded yet)."""
        kind = fields[b"k"]
        reload = None
        event: StreamEvent | bytes | None = None
        heartbeat = self.own.pop(entry_id, None)
        if heartbeat is not None:
            self.apply_heartbeat(entry_id, heartbeat, kind == b"hb")
        elif kind == b"hb":
            heartbeat = decode_record(fields[b"d"])
            self.apply_heartbeat(entry_id, heartbeat, True)
        elif kind == b"dl":
            heartbeat = self._followed(entry_id, fields)
            hive_id = text(fields[b"h"])
            if heartbeat is None and self._applied.get(hive_id, NONE) < (entry_key(entry_id)
                                                                         or NONE):
                if hive_id in self._reloaded:
                    self.deltas_missed += 1
                else:
                    reload = hive_id
        else:
            event = fields[b"d"]
            if b'"hive_removed"' in event or b'"hive_stale"' in event:
                self.apply_event(entry_id, decode_stream_event(event))
        if heartbeat is not None and self.broadcaster.client_count:
            event = telemetry_event(heartbeat, self.config.registry)
        self.position = entry_id
        if event is not None:
            self.broadcaster.publish(event, entry_id)
        return reload

    async def take(self, entries: list[Entry]) -> None:
        """Entries read from the stream, in order: into the mirror, then to this queen's
        clients. A delta that does not follow has its hive's record reloaded first (when that
        is its base, the delta then applies)."""
        for entry_id, fields in entries:
            hive_id = self._on_entry(entry_id, fields)
            if hive_id is not None:
                await self._reload(hive_id)
                self.reloads += 1
                self._on_entry(entry_id, fields)

    async def _reload(self, hive_id: str) -> None:
        """The hive's record from Redis, when newer than what the mirror holds of it."""
        record, whole_id, seen_ms, stale = await self.redis.eval("RECORD", hive_id)
        self._reloaded.add(hive_id)
        key = entry_key(text(whole_id)) if whole_id is not None else None
        if record is None or key is None or key <= self._applied.get(hive_id, NONE):
            return  # removed (its removal follows on the stream), or not newer
        heartbeat = decode_record(record)
        self._applied[hive_id], self._bases[hive_id] = key, heartbeat
        self.registry.update_hive(heartbeat, int(float(seen_ms or key[0])) / 1000,
                                  stale=bool(stale), admit=False)

    def replay(self, entries: list[Entry], first: int
               ) -> tuple[list[tuple[str, StreamEvent | bytes]], set[str]]:
        """The events of ``entries[first:]``, each delta made whole from the entries before it
        (those before ``first`` only serve as bases); and the hives of the deltas among them
        whose base is not in ``entries`` (their events are left out)."""
        held: dict[str, tuple[EntryKey | None, HiveHeartbeat]] = {}
        events: list[tuple[str, StreamEvent | bytes]] = []
        unknown: set[str] = set()
        for index, (entry_id, fields) in enumerate(entries):
            kind = fields[b"k"]
            if kind == b"hb":
                heartbeat = self.own.get(entry_id) or decode_record(fields[b"d"])
            elif kind == b"dl":
                hive_id = text(fields[b"h"])
                base = held.pop(hive_id, None)
                if base is None or base[0] != entry_key(text(fields[b"b"])):
                    if index >= first:
                        unknown.add(hive_id)
                    continue
                try:
                    heartbeat = (self.own.get(entry_id)
                                 or apply_delta(base[1], DELTA_DECODER.decode(fields[b"d"])))
                except (msgspec.ValidationError, msgspec.DecodeError, ContractError):
                    unknown.add(hive_id)
                    continue
            else:
                if index >= first:
                    events.append((entry_id, fields[b"d"]))
                continue
            held[heartbeat.hive.id] = (entry_key(entry_id), heartbeat)
            if index >= first:
                events.append((entry_id, telemetry_event(heartbeat, self.config.registry)))
        return events, unknown

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
            try:
                await self.take([(text(entry_id), fields_of(fields))
                                 for entry_id, fields in next(iter(reply.values())).items()])
            except StoreError as exc:
                redis.failed("stream", exc)
                lost = True
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
