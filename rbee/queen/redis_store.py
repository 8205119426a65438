"""Several queens, one fleet: the registry and the stream in Redis (or Valkey, which speaks its
protocol), shared by every queen that names the same ``registry.store.url`` and ``key_prefix``.

Writes: a heartbeat received by any queen is one Lua script (``redis_lua.HEARTBEAT``): the hive's
record replaced whole, its time of receipt on Redis's clock, and a Redis Stream entry, together.
Reads: each queen keeps a mirror of the fleet (its ``HiveRegistry``), loaded from Redis at start
and then following the stream, so scheduling queries, ``/metrics``, ``/v1/history`` and the
dashboard cover the whole fleet from any queen and cost Redis nothing. A queen applies its own
writes to its mirror at once too (so it reads what it wrote), and every entry only once, in id
order per hive. The SSE stream of every queen is the Redis Stream, in its order, each event with
its entry id as ``id:``; a client may resume on any queen with ``Last-Event-ID`` (``XRANGE``).

Silence is judged on one clock, Redis's (``TIME``, and entry ids). The sweeps run on one queen at a
time, the holder of a lease (``SET NX PX``, renewed every third of ``lease_s``); when it dies
another queen takes it within ``lease_s`` and a third. A new sweeper counts every hive's silence
from the moment it took over (as Nomad gives every node a fresh TTL after a leader failover), so
the fleet is not marked stale because the sweeper moved. The holder also sends the fleet summary.

When Redis is lost the queens keep serving what their mirrors hold, answer heartbeats with 503
(the hives retry), report ``degraded`` on ``/health``, and reconnect on their own; if Redis came
back empty (restarted without persistence) the mirror reloads and every stream client gets a
fresh snapshot; the hives fill Redis again within one heartbeat interval.

The client is valkey-glide (its async client runs on trio through anyio; a Rust core does the
I/O). Two connections per queen: one for blocking ``XREAD``, one for everything else.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence

import msgspec
import trio
from glide import (
    AdvancedGlideClientConfiguration,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    NodeAddress,
    Script,
)

from .._errors import StoreError
from ..config import QueenConfig, parse_redis_url
from ..contract import (
    HiveHeartbeat,
    HiveRemovedEvent,
    HiveStaleEvent,
    StreamEvent,
    decode_stream_event,
    encode,
    utc_now,
    worker_id,
)
from . import redis_lua
from .silence import judge
from .store import every, fleet_view, log_verdict, telemetry_event

log = logging.getLogger(__name__)

EntryKey = tuple[int, int]
HEARTBEAT_DECODER = msgspec.json.Decoder(HiveHeartbeat)
KEY_NAMES = ("hives", "seen", "stale", "stream", "sweeper", "first")
FOLLOW_BATCH_S = 0.005
"""After a read, the follower lets entries gather this long: under load one ``XREAD`` (about
300 us of the client's CPU) then brings many, at the cost of at most this much latency."""
CATCH_UP_WAIT_S = 1.0
"""How long a resuming client waits for this queen to reach the id it last got elsewhere."""


def entry_key(entry_id: str) -> EntryKey | None:
    """A stream entry id (``ms-seq``) as a comparable pair; None if it is not one."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence) -> list[tuple]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def _fields(fields) -> dict[bytes, bytes]:
    """An entry's fields as glide returns them: pairs, or a flat list."""
    if fields and isinstance(fields[0], list):
        return {k: v for k, v in fields}
    return dict(_pairs(fields))


class RedisStore:
    def __init__(self, config: QueenConfig) -> None:
        self.config = config
        self.settings = config.registry.store
        assert self.settings.url is not None  # the config's own check
        self.address = parse_redis_url(self.settings.url)
        prefix = self.settings.key_prefix
        self.keys = [f"{prefix}:{name}" for name in KEY_NAMES]
        self.stream_key = self.keys[3]
        self.maxlen = str(config.stream.replay_events)
        self._offset = time.time() - time.monotonic()
        """Redis's clock less this host's monotonic one, measured every lease tick."""
        fleet_view(self, config, clock=self.redis_now)
        self._problems: dict[str, str] = {}
        self._position = "0-0"
        self._advanced = trio.Event()
        self._applied: dict[str, EntryKey] = {}
        """Per hive, the newest entry its mirror record comes from."""
        self._own: dict[str, HiveHeartbeat] = {}
        """Heartbeats this queen wrote, by entry id, until its follower reads them back."""
        self._token = secrets.token_hex(8)
        self.sweeping = False
        """Whether this queen holds the sweeper's lease."""
        self._grace_from_ms = 0
        self._last_sweep_ms: int | None = None
        self._holding = False
        self._client: GlideClient | None = None
        self._reader: GlideClient | None = None
        self._scripts = {name: Script(getattr(redis_lua, name))
                         for name in ("HEARTBEAT", "REMOVE", "SILENCES", "SWEEP", "SNAPSHOT",
                                      "RENEW", "RELEASE")}

    # -- the FleetStore interface ----------------------------------------------------------

    @property
    def position(self) -> str:
        return self._position

    @property
    def problem(self) -> str | None:
        return "; ".join(self._problems.values()) or None

    def redis_now(self) -> float:
        """Redis's clock (seconds), estimated from this host's monotonic clock."""
        return time.monotonic() + self._offset

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._client = await self._connect()
        try:
            self._reader = await self._connect()
            await self._load()
            await self._lease_tick()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow)
                nursery.start_soon(self._keep_lease)
                nursery.start_soon(self._sweep_loop)
                nursery.start_soon(self._summary_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def ingest(self, heartbeat: HiveHeartbeat, size: int | None = None) -> None:
        # size: unused, Redis trims its Stream by count (MAXLEN ~ stream.replay_events)
        # the registry's admission rules (max_hives, new_hives_per_s) against this queen's
        # mirror of the fleet: the cap is fleet-wide, the rate per queen
        self.registry.admit(heartbeat.hive.id)
        entry_id = _text(await self._eval("HEARTBEAT", heartbeat.hive.id, encode(heartbeat),
                                          self.maxlen))
        if len(self._own) > 1000:  # the follower is not reading them back (Redis lost)
            self._own.clear()
        if (entry_key(entry_id) or (0, 0)) > (entry_key(self._position) or (0, 0)):
            self._own[entry_id] = heartbeat  # else the follower has read it already
        self._apply_heartbeat(entry_id, heartbeat)

    async def remove(self, hive_id: str, reason: str) -> HiveRemovedEvent | None:
        event = HiveRemovedEvent(hive_id=hive_id, reason=reason, timestamp=utc_now(),
                                 worker_ids=[worker_id(hive_id, w)
                                             for w in self.registry.get_workers(hive_id)])
        entry_id = await self._eval("REMOVE", hive_id, encode(event), self.maxlen)
        if entry_id is None:
            return None
        self._apply_event(_text(entry_id), event)
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
            reply = await self._command(self._client, "XRANGE", self.stream_key,
                                        last_id, upto, "COUNT", str(count))
        except StoreError:
            return None  # a snapshot from the mirror then
        entries = list(reply.items()) if isinstance(reply, dict) else [tuple(e) for e in reply]
        if not entries or _text(entries[0][0]) != last_id:
            return None  # trimmed away, or not an id of this stream
        if len(entries) == count and _text(entries[-1][0]) != upto:
            return None  # more missed than kept: never a gap
        return [(_text(entry_id), self._event_of(_text(entry_id), _fields(fields)))
                for entry_id, fields in entries[1:]]

    async def caught_up(self, event_id: str) -> None:
        target = entry_key(event_id)
        if target is None:
            return
        with trio.move_on_after(CATCH_UP_WAIT_S):
            while (entry_key(self._position) or (0, 0)) < target:
                await self._advanced.wait()

    # -- connecting and calling ------------------------------------------------------------

    async def _connect(self) -> GlideClient:
        settings, address = self.settings, self.address
        config = GlideClientConfiguration(
            [NodeAddress(address.host, address.port)], use_tls=address.tls,
            database_id=address.db, request_timeout=int(settings.request_timeout_s * 1000),
            client_name="rbee-queen",
            advanced_config=AdvancedGlideClientConfiguration(
                connection_timeout=int(settings.connect_timeout_s * 1000)))
        try:
            with trio.fail_after(settings.connect_timeout_s + 1):
                return await GlideClient.create(config)
        except (GlideError, trio.TooSlowError) as exc:
            raise StoreError(f"cannot reach Redis at {settings.url} "
                             f"(registry.store.url): {_describe(exc)}") from exc

    async def _close(self) -> None:
        if self._client is not None and self.sweeping:
            with trio.move_on_after(self.settings.request_timeout_s):
                try:
                    await self._eval("RELEASE", self._token)
                except StoreError:
                    pass
        for client in (self._reader, self._client):
            if client is not None:
                with trio.move_on_after(self.settings.request_timeout_s):
                    await client.close()

    async def _eval(self, name: str, *args: str | bytes):
        assert self._client is not None
        try:
            return await self._client.invoke_script(self._scripts[name], keys=self.keys,
                                                    args=list(args))
        except GlideError as exc:
            raise StoreError(f"Redis at {self.settings.url}: {_describe(exc)}") from exc

    async def _command(self, client: GlideClient, *args: str | bytes):
        try:
            return await client.custom_command(list(args))
        except GlideError as exc:
            raise StoreError(f"Redis at {self.settings.url}: {_describe(exc)}") from exc

    def _ok(self, task: str) -> None:
        if self._problems.pop(task, None) is not None:
            log.warning("the registry store works again (%s)", task)

    def _failed(self, task: str, exc: Exception) -> None:
        if task not in self._problems:
            log.warning("the registry store failed (%s): %s; serving what this queen holds",
                        task, exc)
        self._problems[task] = str(exc)

    # -- the mirror ------------------------------------------------------------------------

    async def _load(self) -> None:
        """Replace the mirror with the fleet as Redis holds it, as of one stream entry."""
        last_id, hives, seen, stale = await self._eval("SNAPSHOT")
        seen_ms = {_text(hive): int(score) for hive, score in _pairs(seen)}
        stale_set = {_text(hive) for hive in stale}
        self.registry.clear()
        self._applied.clear()
        self._own.clear()
        for hive, data in _pairs(hives):
            hive_id = _text(hive)
            received_ms = seen_ms.get(hive_id, 0)
            self.registry.update_hive(HEARTBEAT_DECODER.decode(data), received_ms / 1000,
                                      stale=hive_id in stale_set, admit=False)
            self._applied[hive_id] = (received_ms, -1)
        self._position = _text(last_id)
        self._advance()

    def _apply_heartbeat(self, entry_id: str, heartbeat: HiveHeartbeat) -> None:
        key = entry_key(entry_id)
        assert key is not None
        hive_id = heartbeat.hive.id
        if self._applied.get(hive_id, (0, -1)) >= key:
            return  # the mirror already has this or a newer one
        self._applied[hive_id] = key
        self.registry.update_hive(heartbeat, key[0] / 1000, admit=False)

    def _apply_event(self, entry_id: str, event: StreamEvent) -> None:
        key = entry_key(entry_id)
        assert key is not None
        if isinstance(event, HiveRemovedEvent):
            if self._applied.get(event.hive_id, (0, -1)) < key:
                self._applied[event.hive_id] = key
                self.registry.remove_hive(event.hive_id)
        elif (isinstance(event, HiveStaleEvent)
              and self._applied.get(event.hive_id, (0, -1)) < key):
            self.registry.mark_stale(event.hive_id)

    def _event_of(self, entry_id: str, fields: dict[bytes, bytes]) -> StreamEvent | bytes:
        """An entry's event: a heartbeat's as the stream tells it, or the JSON as stored."""
        if fields[b"k"] == b"hb":
            return telemetry_event(self._own.get(entry_id)
                                   or HEARTBEAT_DECODER.decode(fields[b"d"]),
                                   self.config.registry)
        return fields[b"d"]

    def _on_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """One entry read from the stream: into the mirror, then to this queen's clients."""
        data = fields[b"d"]
        if fields[b"k"] == b"hb":
            heartbeat = self._own.pop(entry_id, None) or HEARTBEAT_DECODER.decode(data)
            self._apply_heartbeat(entry_id, heartbeat)
            event: StreamEvent | bytes = telemetry_event(heartbeat, self.config.registry)
        else:
            event = data
            if b'"hive_removed"' in data or b'"hive_stale"' in data:
                self._apply_event(entry_id, decode_stream_event(data))
        self._position = entry_id
        self.broadcaster.publish(event, entry_id)

    def _advance(self) -> None:
        self._advanced.set()
        self._advanced = trio.Event()

    async def _follow(self) -> None:
        """Read the stream after the mirror's position, forever; after losing Redis, go on from
        there if Redis still has that entry, else reload the mirror and resync the clients."""
        assert self._reader is not None
        block_ms = str(max(1, int(self.settings.request_timeout_s * 500)))
        lost = False
        while True:
            try:
                if lost:
                    await self._resume()
                    lost = False
                reply = await self._command(self._reader, "XREAD", "COUNT", "1000", "BLOCK",
                                            block_ms, "STREAMS", self.stream_key, self._position)
                self._ok("stream")
            except StoreError as exc:
                self._failed("stream", exc)
                lost = True
                await trio.sleep(min(1.0, self.settings.lease_s / 3))
                continue
            if not reply:
                continue
            for entry_id, fields in next(iter(reply.values())).items():
                self._on_entry(_text(entry_id), _fields(fields))
            self._advance()
            await trio.sleep(FOLLOW_BATCH_S)

    async def _resume(self) -> None:
        assert self._reader is not None
        reply = await self._command(self._reader, "XRANGE", self.stream_key, self._position,
                                    self._position)
        if reply:
            return
        log.warning("Redis no longer holds stream entry %s (restarted empty?): reloading the "
                    "fleet and sending every stream client a snapshot", self._position)
        await self._load()
        self.broadcaster.resync_all()

    # -- the sweeper -----------------------------------------------------------------------

    async def _sync_clock(self) -> None:
        assert self._client is not None
        before = time.monotonic()
        seconds, micros = await self._command(self._client, "TIME")
        after = time.monotonic()
        self._offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2

    async def _keep_lease(self) -> None:
        """Clock, health and lease, every third of ``lease_s``."""
        async for _ in every(self.settings.lease_s / 3):
            await self._lease_tick()

    async def _lease_tick(self) -> None:
        """Renew the lease while this queen holds it, else try to take it."""
        assert self._client is not None
        lease_ms = str(int(self.settings.lease_s * 1000))
        try:
            await self._sync_clock()
            if self.sweeping:
                if await self._eval("RENEW", self._token, lease_ms) != 1:
                    self.sweeping = False
                    log.warning("this queen lost the sweeper's lease")
            elif await self._command(self._client, "SET", self.keys[4], self._token, "NX",
                                     "PX", lease_ms) is not None:
                self.sweeping = True
                self._grace_from_ms = int(self.redis_now() * 1000)
                self._last_sweep_ms = None
                log.info("this queen sweeps the fleet now (lease %s)", self.keys[4])
            self._ok("lease")
        except StoreError as exc:
            self.sweeping = False
            self._failed("lease", exc)

    async def _sweep_loop(self) -> None:
        async for _ in every(self.config.registry.cleanup_interval_s):
            if not self.sweeping:
                continue
            try:
                await self._sweep()
            except StoreError as exc:
                self._failed("sweep", exc)
            else:
                self._ok("sweep")

    async def _sweep(self) -> None:
        """Judge every hive's silence on Redis's clock (``silence.judge``, sticky stale flags),
        then apply the verdicts in one script that checks the lease and the silences again."""
        settings = self.config.registry
        now_ms, seen, flagged, first = await self._eval("SILENCES")
        if self._last_sweep_ms is not None and now_ms - self._last_sweep_ms > \
                settings.stale_after_s * 1000:
            log.warning("the sweeper did not sweep for %.1fs (stalled or suspended); restarting "
                        "every hive's silence count", (now_ms - self._last_sweep_ms) / 1000)
            self._grace_from_ms = now_ms - int(settings.cleanup_interval_s * 1000)
        self._last_sweep_ms = now_ms
        seen_ms = {_text(hive): int(score) for hive, score in _pairs(seen)}
        silent = {hive: (now_ms - max(ms, self._grace_from_ms)) / 1000
                  for hive, ms in seen_ms.items()}
        first_ms = {_text(hive): int(score) for hive, score in _pairs(first)}
        established = {hive for hive, ms in seen_ms.items()
                       if ms - first_ms.get(hive, ms) >= settings.established_after_s * 1000}
        verdict = judge(silent, {_text(hive) for hive in flagged}, settings,
                        established=established, holding=self._holding, sticky=True)
        self._holding = verdict.holding
        events: list[HiveStaleEvent | HiveRemovedEvent] = [
            HiveStaleEvent(hive_id=hive, silent_s=round(silent[hive], 3), timestamp=utc_now())
            for hive in verdict.newly_stale]
        events += [HiveRemovedEvent(
            hive_id=hive, timestamp=utc_now(),
            worker_ids=[worker_id(hive, w) for w in self.registry.get_workers(hive)],
            reason=f"no heartbeat for {silent[hive]:.1f}s "
                   f"(remove_after_s: {settings.remove_after_s:g})") for hive in verdict.expired]
        if not events:
            return
        args: list[str | bytes] = [self._token, self.maxlen, str(len(verdict.newly_stale))]
        for event in events:
            args += [event.hive_id, str(seen_ms[event.hive_id]), encode(event)]
        if await self._eval("SWEEP", *args) == -1:
            self.sweeping = False
            log.warning("this queen lost the sweeper's lease before its sweep landed")
            return
        for event in events:
            log_verdict(event)

    async def _summary_loop(self) -> None:
        """The fleet summary on the stream, from the sweeping queen only (one per interval)."""
        assert self._client is not None
        async for _ in every(self.config.stream.queen_interval_s):
            if not self.sweeping:
                continue
            try:
                await self._command(self._client, "XADD", self.stream_key, "MAXLEN", "~",
                                    self.maxlen, "*", "k", "ev", "d",
                                    encode(self.registry.summary()))
            except StoreError as exc:
                self._failed("summary", exc)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
