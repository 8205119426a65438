"""TelemetryCollector: one tick of per-worker telemetry, through the collector plugins.

Each tick reads every worker's stat files in one call (``rbee.statfiles``, Cython when built), drops
workers whose main process has gone (handing them to ``on_gone``: the hive reaps them in a thread
of their own, so a worker that left children behind never holds a tick), then lets each plugin
fill in its fields. What it keeps per worker between ticks (open stat files, recent readings, the
plugins' view) is ``rbee.hive.sampling``'s ``Sampled``. Plugins see each
worker through its ``rbee.plugin.WorkerView`` (one per worker, kept for its life) and are called
one by one (``PluginHooks``, through pluggy): one failing plugin or one dying worker costs that
worker one field and an entry in its ``errors``, never the tick; a plugin over its per-tick budget
(``collect.plugin_budget_ms``) is skipped for the rest of the tick, and said so in the log at most
once a minute per plugin. Counters a plugin declares ``as_rate`` become rates after the plugins
ran (``rbee.plugin.rates``); what the plugins are, and declare, is read once at start-up
(``rbee.plugin.declarations``) and logged.

Collection itself never blocks on the GPU or the network: ``refresh_devices`` (NVML, nvidia-smi)
is run by the hive in a worker thread under a deadline, ``refresh_workers`` (engine metrics) in its
own trio task, and the per-worker hooks read what they cached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import msgspec
import pluggy
import trio

from .. import statfiles
from .._errors import NotFoundError, PluginError
from .._sample import StatSample
from ..config import CollectorSettings
from ..contract import CollectorIssue, GpuDevice, PluginInfo, WorkerTelemetry
from ..plugin import WorkerView
from ..plugin.declarations import configure_plugins, describe_plugins, rate_keys
from ..plugin.manager import PluginHooks
from ..plugin.rates import CounterRates
from .processes import ProcessMonitor, Worker
from .procfs import GONE_STATES
from .sampling import Sampled, exited

log = logging.getLogger(__name__)

TRIM_EVERY = 16
"""Ticks between two checks of the workers' unnamed stderr files' sizes (``stderr_tail``)."""
WARN_EVERY_S = 60.0
"""At most one over-budget warning per plugin in this many seconds: a slow plugin is slow every
tick, and one line a second buries the rest of the log."""


def issue(collector: str, exc: BaseException) -> CollectorIssue:
    return CollectorIssue(collector=collector, message=f"{type(exc).__name__}: {exc}")


class TelemetryCollector:
    def __init__(self, monitor: ProcessMonitor, plugins: pluggy.PluginManager,
                 settings: CollectorSettings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 read_sample: Callable[..., StatSample] | None = None,
                 on_gone: Callable[[Worker], object] | None = None,
                 plugin_config: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        """``read_sample`` overrides the stat parser (benchmarks compare the two twins).
        ``on_gone`` gets each worker found exited in a tick; the default reaps it there and
        then (``ProcessMonitor.reap``), the hive hands it to a thread of its own.
        ``plugin_config`` is the ``plugins:`` section of hive.yaml, one entry per plugin."""
        self.read_sample = read_sample or statfiles.read_sample
        self.monitor = monitor
        self.on_gone = on_gone or monitor.reap
        self.plugins = plugins
        self.settings = settings or CollectorSettings()
        self.clock = clock
        self.devices: list[GpuDevice] = []
        self.devices_at = clock()
        self.refresh_errors: list[CollectorIssue] = []
        """What went wrong in the last device refresh; the hive reports itself degraded then."""
        self.sample_errors: list[CollectorIssue] = []
        self.worker_refresh_errors: list[CollectorIssue] = []
        """What went wrong in the last async worker refresh (``rbee_refresh_workers``)."""
        self.over_budget: dict[str, float] = {}
        """Plugins skipped in the last tick for overrunning their budget, with the ms they took."""
        self._warned_at: dict[str, tuple[float, int]] = {}
        """Per plugin: when its over-budget warning was last logged, and ticks over since."""
        self.plugin_infos: list[PluginInfo] = describe_plugins(plugins)
        """The third-party plugins and what they declare, for the heartbeat's ``HiveInfo``."""
        self.counter_rates = CounterRates(rate_keys(self.plugin_infos), self.settings.rate_window_s)
        self._setup(configure_plugins(plugins, plugin_config or {}))
        self.hooks = PluginHooks(plugins)
        self._budget_s = self.settings.plugin_budget_ms / 1000
        self._ticks = 0
        self._sampled: dict[Worker, Sampled] = {}
        self._sampled_lock = threading.Lock()

    def _setup(self, configs: Mapping[str, object]) -> None:
        """Log the plugins, then call each one's setup with its own config section."""
        loaded = {self.plugins.get_name(p): f"{d.project_name} {d.version}"
                  for p, d in self.plugins.list_plugin_distinfo()}
        names = sorted(filter(None, map(self.plugins.get_name, self.plugins.get_plugins())))
        log.info("collector plugins: %s", ", ".join(
            f"{name} ({loaded.get(name, 'registered directly')})" for name in names))
        for name, call in PluginHooks(self.plugins).callers("rbee_collector_setup"):
            try:
                call(settings=self.settings, plugin_manager=self.plugins,
                     config=configs.get(name))
            except Exception as exc:
                raise PluginError(f"plugin {name!r}: rbee_collector_setup raised "
                                  f"{type(exc).__name__}: {exc}", plugin=name,
                                  hook="rbee_collector_setup") from exc

    def close(self) -> None:
        self.plugins.hook.rbee_collector_teardown()
        with self._sampled_lock:
            for sampled in self._sampled.values():
                sampled.close()
            self._sampled.clear()

    def refresh_devices(self) -> list[GpuDevice]:
        """Blocking: ask every plugin for hive-wide devices. Run it off the event loop.

        Plugins are asked one by one; one that fails is recorded in ``refresh_errors`` and the
        devices of the others are kept."""
        devices: list[GpuDevice] = []
        self.refresh_errors = self._call_each("rbee_refresh_devices",
                                              lambda found: devices.extend(found or ()))
        self.devices = devices
        self.devices_at = self.clock()
        return devices

    def sample_devices(self) -> None:
        """Blocking: the plugins' slow sampling (per-process GPU utilisation), on its own thread.
        One that fails is recorded in ``sample_errors``."""
        self.sample_errors = self._call_each("rbee_sample_devices")

    def devices_now(self) -> list[GpuDevice]:
        """The devices of the last refresh, each with its figures' age as of now."""
        age = max(0.0, self.clock() - self.devices_at)
        return [msgspec.structs.replace(device, sample_age_s=round(device.sample_age_s + age, 3))
                for device in self.devices]

    def _call_each(self, hook_name: str, take: Callable[[object], object] = lambda result: None
                   ) -> list[CollectorIssue]:
        """Call each plugin's implementation of a hook on its own, through pluggy; ``take`` gets
        each one's result. Returns the failures, one per plugin that raised."""
        errors = []
        for name, call in self.hooks.callers(hook_name):
            try:
                for result in call():
                    take(result)
            except Exception as exc:
                errors.append(issue(name, exc))
        return errors

    async def refresh_workers(self, http: httpx.AsyncClient, deadline_s: float) -> None:
        """Run every plugin's ``rbee_refresh_workers`` concurrently, each cancelled after
        ``deadline_s``. A plugin that raises or overruns is recorded in
        ``worker_refresh_errors``; the others' results stand."""
        views = self.views()
        errors: list[CollectorIssue] = []

        async def run(name: str, call: pluggy.HookCaller) -> None:
            with trio.move_on_after(deadline_s) as scope:
                try:
                    for pending in call(workers=views, http=http):
                        if pending is not None:
                            await pending
                except Exception as exc:
                    errors.append(issue(name, exc))
            if scope.cancelled_caught:
                errors.append(CollectorIssue(
                    collector=name, message=f"worker refresh took longer than {deadline_s:g}s"))

        async with trio.open_nursery() as nursery:
            for name, call in self.hooks.callers("rbee_refresh_workers"):
                nursery.start_soon(run, name, call)
        self.worker_refresh_errors = errors

    # -- what is kept per worker ---------------------------------------------------------

    def views(self) -> list[WorkerView]:
        """The view of every worker the monitor has now (made on first sight, kept for life)."""
        return [self._sampled_of(worker).view for worker in self.monitor.workers()]

    def _sampled_of(self, worker: Worker) -> Sampled:
        sampled = self._sampled.get(worker)
        if sampled is None:
            with self._sampled_lock:
                sampled = self._sampled.get(worker)
                if sampled is None:
                    sampled = self._sampled[worker] = Sampled(worker, self.settings.rate_window_s)
        return sampled

    def _drop_ended(self) -> None:
        """Close what is kept of workers that have ended (in the tick's thread: only the tick
        reads their files)."""
        with self._sampled_lock:
            for worker in [w for w in self._sampled if w.exited]:
                self._sampled.pop(worker).close()

    # -- the collection API ---------------------------------------------------------------

    def collect_all(self) -> list[WorkerTelemetry]:
        return self._collect(self.monitor.workers())

    def collect_group(self, group: str) -> list[WorkerTelemetry]:
        """Workers of one group; an unknown group gives an empty list."""
        return self._collect([w for w in self.monitor.workers() if w.group == group])

    def collect_instance(self, group: str, instance: str) -> WorkerTelemetry:
        """One worker; NotFoundError when it does not exist or has just exited."""
        records = self._collect([self.monitor.get(group, instance)])
        if not records:
            raise NotFoundError(f"worker {group}/{instance} has exited")
        return records[0]

    def _collect(self, workers: list[Worker]) -> list[WorkerTelemetry]:
        self._drop_ended()
        sampled = [self._sampled_of(worker) for worker in workers]
        gone = exited(sampled)
        self._ticks += 1
        if self._ticks % TRIM_EVERY == 0:
            for worker in workers:
                if worker.output is not None:
                    worker.output.trim()
        live: list[tuple[WorkerView, WorkerTelemetry]] = []
        for entry in sampled:
            if entry.worker.pid in gone:
                self.on_gone(entry.worker)
                continue
            record = self._record(entry)
            if record is not None:
                live.append((entry.view, record))
        spent = self._fill(live)
        rates = self.counter_rates
        if rates.keys:
            now = self.clock()
            for view, record in live:
                if record.metrics:
                    rates.apply(view, now, record.metrics)
        self.over_budget = {name: round(seconds * 1000, 1) for name, seconds in spent.items()
                            if seconds > self._budget_s}
        if self.over_budget:
            self._warn_over_budget()
        return [record for _, record in live]

    def _warn_over_budget(self) -> None:
        """One warning per plugin per ``WARN_EVERY_S``, counting the ticks it was over since."""
        now = self.clock()
        for name, ms in self.over_budget.items():
            warned_at, ticks = self._warned_at.get(name, (None, 0))
            if warned_at is not None and now - warned_at < WARN_EVERY_S:
                self._warned_at[name] = (warned_at, ticks + 1)
                continue
            since = (f" ({ticks} more ticks over budget in the last {now - warned_at:.0f} s)"
                     if warned_at is not None and ticks else "")
            log.warning("plugin %s took %.1f ms this tick, over its %g ms budget: skipped for "
                        "the rest of the tick%s", name, ms, self.settings.plugin_budget_ms, since)
            self._warned_at[name] = (now, 0)

    def _record(self, sampled: Sampled) -> WorkerTelemetry | None:
        """This tick's sample of one worker, its view advanced, and its record before the
        plugins; None when its main process has gone (handed to ``on_gone``)."""
        worker = sampled.worker
        now = self.clock()
        stats = sampled.stats
        sample = self.read_sample(*stats.args)
        if stats.pidfd < 0 and sample.proc_state in GONE_STATES:
            self.on_gone(worker)
            return None
        previous, elapsed = sampled.rates.advance(now, sample)
        sampled.view._advance(sample, previous, elapsed)
        limits = worker.limits
        record = WorkerTelemetry(
            pid=worker.pid, group=worker.group, instance=worker.instance, cpu_pct=0.0,
            rss_mb=0, io_r_mb_s=0.0, io_w_mb_s=0.0, uptime_s=0, gpu_util_pct=None, vram_mb=0,
            total_vram_mb=0, model=None, rate_window_s=int(elapsed * 1000) / 1000,
            cpu_limit_pct=limits.cpu_pct, memory_limit_mb=limits.memory_mb,
            limits_applied=worker.limits_applied,
        )
        oom = worker.oom
        if oom is not None:  # read where its own limit can OOM-kill it; the last count otherwise
            record.oom_kills = oom.read() if limits.memory_bytes is not None else oom.last
        return record

    def _fill(self, live: list[tuple[WorkerView, WorkerTelemetry]]) -> dict[str, float]:
        """Each plugin over every worker in turn (so each worker still sees the plugins in
        pluggy's order), timed as a whole: one clock reading a call, and a plugin whose calls
        pass its budget is skipped for the workers left. Returns the seconds each plugin took."""
        budget = self._budget_s
        perf_counter = time.perf_counter
        spent: dict[str, float] = {}
        for name, call in self.hooks.per_worker():
            used = 0.0
            started = perf_counter()
            for index, (view, record) in enumerate(live):
                try:
                    call(view, record)
                except Exception as exc:
                    record.errors.append(issue(name, exc))
                used = perf_counter() - started
                if used > budget:
                    message = (f"skipped: over its {budget * 1000:g} ms budget this tick "
                               f"({used * 1000:.1f} ms)")
                    for _, later in live[index + 1:]:
                        later.errors.append(CollectorIssue(collector=name, message=message))
                    break
            spent[name] = used
        return spent
