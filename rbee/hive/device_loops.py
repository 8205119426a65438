"""The hive's device and engine loops, each on its own cadence so none delays a collection tick:
the GPU refresh (devices, health, process lists), the per-process GPU sample, the plugins'
async per-worker refresh (engine metrics), and the fast engine poll (``engine_poll``). Blocking
device work runs in a worker thread under ``collect.refresh_timeout_s`` and is abandoned past it,
so a hung driver delays nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import httpx
import trio

from ..config import CollectorSettings
from ..contract import CollectorIssue
from .collection import TelemetryCollector
from .engine_poll import Change, EnginePoller, WorkerKey
from .origins import OriginPools

log = logging.getLogger(__name__)


class DeviceLoops:
    def __init__(self, collector: TelemetryCollector, settings: CollectorSettings,
                 publish: Callable[[Mapping[WorkerKey, Change]], object] | None = None) -> None:
        self.collector = collector
        self.settings = settings
        self.engine_poll: EnginePoller | None = None
        """The fast engine poll, publishing through ``publish``; none without it, or with the
        engine collector disabled."""
        if publish is not None and "engine" not in settings.disabled_plugins:
            self.engine_poll = EnginePoller(collector.views, settings.engine, publish)
        self.refresh_issue: CollectorIssue | None = None
        self.sample_issue: CollectorIssue | None = None
        self._refresh_limiter = trio.CapacityLimiter(1)
        self._sample_limiter = trio.CapacityLimiter(1)

    def issues(self) -> list[CollectorIssue]:
        """The refresh or sample that ran late last time, if any."""
        return [issue for issue in (self.refresh_issue, self.sample_issue) if issue]

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._refresh_loop)
        nursery.start_soon(self._sample_loop)
        nursery.start_soon(self._refresh_workers_loop)
        if self.engine_poll is not None:
            nursery.start_soon(self.engine_poll.run)

    async def _refresh_loop(self) -> None:
        while True:
            self.refresh_issue = await self._off_loop(
                self.collector.refresh_devices, self._refresh_limiter, "device refresh")
            await trio.sleep(self.settings.interval_s)

    async def _refresh_workers_loop(self) -> None:
        """The plugins' async per-worker refresh (engine metrics), on its own cadence: it never
        delays a collection tick, and the tick reads whatever it last stored. One HTTP client (a
        small pool per origin, ``OriginPools``) serves every plugin for the hive's life and is
        closed when the hive stops."""
        settings = self.settings
        async with httpx.AsyncClient(transport=OriginPools(), timeout=settings.engine.timeout_s,
                                     trust_env=False) as http:
            while True:
                next_at = trio.current_time() + settings.interval_s
                await self.collector.refresh_workers(http, settings.refresh_timeout_s)
                await trio.sleep_until(next_at)

    async def _sample_loop(self) -> None:
        """Per-process GPU utilisation, once per tick on a thread of its own: at 1.4-2.6 ms a GPU
        it must not sit on the refresh's path. The next sample starts one interval after the
        last one started, so the figures are never older than a tick plus one sample's cost."""
        interval = self.settings.interval_s
        while True:
            started = trio.current_time()
            self.sample_issue = await self._off_loop(
                self.collector.sample_devices, self._sample_limiter, "GPU sample")
            await trio.sleep_until(started + interval)

    async def _off_loop(self, work: Callable[[], object], limiter: trio.CapacityLimiter,
                        what: str) -> CollectorIssue | None:
        """Run blocking device work in a thread under ``refresh_timeout_s``; past it the work is
        abandoned (a hung driver delays nothing) and reported."""
        timeout = self.settings.refresh_timeout_s
        with trio.move_on_after(timeout) as scope:
            await trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("%s took longer than %gs; going on without it", what, timeout)
            return CollectorIssue(collector="refresh",
                                  message=f"{what} took longer than {timeout:g}s")
        return None
