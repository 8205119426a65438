"""The sweeper of a shared fleet: one queen at a time, the holder of a lease (``SET NX PX``,
renewed every third of ``lease_s``), judges every hive's silence on Redis's clock and sends the
fleet summary. A new sweeper counts every hive's silence from the moment it took over (as Nomad
gives every node a fresh TTL after a leader failover), so the fleet is not marked stale because
the sweeper moved."""

from __future__ import annotations

import logging
import secrets

import trio

from ..._errors import StoreError
from ...config import QueenConfig
from ...contract import HiveRemovedEvent, HiveStaleEvent, encode, utc_now, worker_id
from ..registry import HiveRegistry
from ..silence import StallRule, judge
from ..store import log_verdict
from ..summary import FleetTotals
from ..ticks import every
from .connection import RedisClock, RedisConnection, pairs
from .keys import text

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, config: QueenConfig, redis: RedisConnection, registry: HiveRegistry,
                 clock: RedisClock) -> None:
        self.config = config
        self.redis = redis
        self.registry = registry
        self.clock = clock
        self.maxlen = str(config.stream.replay_events)
        self.token = secrets.token_hex(8)
        self.sweeping = False
        """Whether this queen holds the sweeper's lease."""
        self._grace_from_ms = 0
        self._stall = StallRule(config.registry)
        self._holding = False
        self.totals = FleetTotals(config.registry, registry.hive_ids)
        """The summary, kept by following the mirror (``summary.FleetTotals``): at 10,000 hives
        adding it up from scratch held the event loop ~300 ms."""
        registry.observe(self.totals.hive_changed)

    async def keep_lease(self) -> None:
        """Clock, health and lease, every third of ``lease_s``."""
        async for _ in every(self.redis.settings.lease_s / 3):
            await self.lease_tick()

    async def lease_tick(self) -> None:
        """Renew the lease while this queen holds it, else try to take it."""
        redis = self.redis
        lease_ms = str(int(redis.settings.lease_s * 1000))
        try:
            await self.clock.sync(redis)
            if self.sweeping:
                if await redis.eval("RENEW", self.token, lease_ms) != 1:
                    self.sweeping = False
                    log.warning("this queen lost the sweeper's lease")
            elif await redis.command("SET", redis.keys.sweeper, self.token, "NX", "PX",
                                     lease_ms) is not None:
                self.sweeping = True
                self._grace_from_ms = int(self.clock.now() * 1000)
                self._stall.last = None
                log.info("this queen sweeps the fleet now (lease %s)", redis.keys.sweeper)
            redis.ok("lease")
        except StoreError as exc:
            self.sweeping = False
            redis.failed("lease", exc)

    async def release(self) -> None:
        """Give the lease up (at shutdown), so another queen sweeps at once."""
        if self.redis.client is not None and self.sweeping:
            with trio.move_on_after(self.redis.settings.request_timeout_s):
                try:
                    await self.redis.eval("RELEASE", self.token)
                except StoreError:
                    pass

    async def sweep_loop(self) -> None:
        async for _ in every(self.config.registry.cleanup_interval_s):
            if not self.sweeping:
                continue
            try:
                await self.sweep()
            except StoreError as exc:
                self.redis.failed("sweep", exc)
            else:
                self.redis.ok("sweep")

    async def sweep(self) -> None:
        """Judge every hive's silence on Redis's clock (``silence.judge``, sticky stale flags),
        then apply the verdicts in one script that checks the lease and the silences again."""
        settings = self.config.registry
        now_ms, seen, flagged, first = await self.redis.eval("SILENCES")
        counted_from = self._stall.restart_from(now_ms / 1000)
        if counted_from is not None:
            self._grace_from_ms = int(counted_from * 1000)
        seen_ms = {text(hive): int(score) for hive, score in pairs(seen)}
        silent = {hive: (now_ms - max(ms, self._grace_from_ms)) / 1000
                  for hive, ms in seen_ms.items()}
        first_ms = {text(hive): int(score) for hive, score in pairs(first)}
        established = {hive for hive, ms in seen_ms.items()
                       if ms - first_ms.get(hive, ms) >= settings.established_after_s * 1000}
        verdict = judge(silent, {text(hive) for hive in flagged}, settings,
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
        args: list[str | bytes] = [self.token, self.maxlen, str(len(verdict.newly_stale))]
        for event in events:
            args += [event.hive_id, str(seen_ms[event.hive_id]), encode(event)]
        if await self.redis.eval("SWEEP", *args) == -1:
            self.sweeping = False
            log.warning("this queen lost the sweeper's lease before its sweep landed")
            return
        for event in events:
            log_verdict(event)

    async def summary_loop(self) -> None:
        """The fleet summary on the stream, from the sweeping queen only (one per interval)."""
        async for _ in every(self.config.stream.queen_interval_s):
            if not self.sweeping:
                continue
            try:
                await self.redis.command("XADD", self.redis.keys.stream, "MAXLEN", "~",
                                         self.maxlen, "*", "k", "ev", "d",
                                         await self.totals.event())
            except StoreError as exc:
                self.redis.failed("summary", exc)
