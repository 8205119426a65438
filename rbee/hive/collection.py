"""TelemetryCollector: one tick of per-worker telemetry, through the collector plugins.

Each tick reads every worker's stat files in one call (``rbee.statfiles``, Cython when built), drops
workers whose main process has gone, then lets each plugin fill in its fields. Plugins are called
one by one per worker, each in its own ``try``: one failing plugin or one dying worker costs that
worker one field and an entry in its ``errors``, never the tick.

Collection itself never blocks on the GPU: ``refresh_devices`` (NVML, nvidia-smi) is run by the hive
in a worker thread under a deadline, and the per-worker hooks read what it cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pluggy

from .. import statfiles
from .._errors import NotFoundError
from .._sample import StatSample
from ..config import CollectorSettings
from ..telemetry import CollectorIssue, GpuDevice, WorkerTelemetry
from .monitor import GONE_STATES, ProcessMonitor, Worker, exited

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerSample:
    """What a plugin sees of one worker at one tick."""

    worker: Worker
    sample: StatSample
    previous: StatSample | None
    """The sample of the previous tick, None on the worker's first."""
    elapsed_s: float
    """Seconds since the previous sample; 0.0 on the first."""


@dataclass(slots=True)
class _Impl:
    name: str
    function: Callable[..., object]
    wants_worker: bool
    wants_telemetry: bool


class TelemetryCollector:
    def __init__(self, monitor: ProcessMonitor, plugins: pluggy.PluginManager,
                 settings: CollectorSettings | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 read_sample: Callable[..., StatSample] | None = None) -> None:
        """``read_sample`` overrides the stat parser (benchmarks compare the two twins)."""
        self.read_sample = read_sample or statfiles.read_sample
        self.monitor = monitor
        self.plugins = plugins
        self.settings = settings or CollectorSettings()
        self.clock = clock
        self.devices: list[GpuDevice] = []
        self.devices_at = clock()
        self.refresh_errors: list[CollectorIssue] = []
        """What went wrong in the last device refresh; the hive reports itself degraded then."""
        self.sample_errors: list[CollectorIssue] = []
        plugins.hook.rbee_collector_setup(settings=self.settings, plugin_manager=plugins)
        self._impls = self._worker_impls()

    def _worker_impls(self) -> list[_Impl]:
        # Called directly rather than through the hook so that each is isolated; pluggy's own
        # order (last registered first, tryfirst/trylast honoured) is kept.
        impls = reversed(self.plugins.hook.rbee_collect_worker.get_hookimpls())
        return [
            _Impl(impl.plugin_name, impl.function, "worker" in impl.argnames,
                  "telemetry" in impl.argnames)
            for impl in impls
        ]

    def close(self) -> None:
        self.plugins.hook.rbee_collector_teardown()

    def refresh_devices(self) -> list[GpuDevice]:
        """Blocking: ask every plugin for hive-wide devices. Run it off the event loop.

        Plugins are asked one by one; one that fails is recorded in ``refresh_errors`` and the
        devices of the others are kept."""
        devices: list[GpuDevice] = []
        self.refresh_errors = self._call_each(self.plugins.hook.rbee_refresh_devices,
                                              lambda found: devices.extend(found or ()))
        self.devices = devices
        self.devices_at = self.clock()
        return devices

    def sample_devices(self) -> None:
        """Blocking: the plugins' slow sampling (per-process GPU utilisation), on its own thread.
        One that fails is recorded in ``sample_errors``."""
        self.sample_errors = self._call_each(self.plugins.hook.rbee_sample_devices)

    def devices_now(self) -> list[GpuDevice]:
        """The devices of the last refresh, each with its figures' age as of now."""
        age = max(0.0, self.clock() - self.devices_at)
        return [msgspec.structs.replace(device, sample_age_s=round(device.sample_age_s + age, 3))
                for device in self.devices]

    @staticmethod
    def _call_each(hook, take: Callable[[object], object] = lambda result: None
                   ) -> list[CollectorIssue]:
        errors = []
        for impl in reversed(hook.get_hookimpls()):
            try:
                take(impl.function())
            except Exception as exc:
                errors.append(CollectorIssue(collector=impl.plugin_name,
                                             message=f"{type(exc).__name__}: {exc}"))
        return errors

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
        gone = exited(workers)
        records = []
        for worker in workers:
            if worker.pid in gone:
                self.monitor.reap(worker)
                continue
            record = self._collect_one(worker)
            if record is not None:
                records.append(record)
        return records

    def _collect_one(self, worker: Worker) -> WorkerTelemetry | None:
        now = self.clock()
        sample = self.read_sample(*worker.stats.args)
        if worker.stats.pidfd < 0 and sample.proc_state in GONE_STATES:
            self.monitor.reap(worker)
            return None
        previous = worker.previous
        view = WorkerSample(worker, sample, previous,
                            now - worker.previous_at if previous is not None else 0.0)
        record = WorkerTelemetry(
            pid=worker.pid, group=worker.group, instance=worker.instance, cpu_pct=0.0,
            rss_mb=0, io_r_mb_s=0.0, io_w_mb_s=0.0, uptime_s=0, gpu_util_pct=0.0, vram_mb=0,
            total_vram_mb=0, model=None, rate_window_s=int(view.elapsed_s * 1000) / 1000,
            cpu_limit_pct=worker.limits.cpu_pct, memory_limit_mb=worker.limits.memory_mb,
            limits_applied=worker.limits_applied,
        )
        for impl in self._impls:
            try:
                if impl.wants_worker and impl.wants_telemetry:
                    impl.function(worker=view, telemetry=record)
                elif impl.wants_telemetry:
                    impl.function(telemetry=record)
                else:
                    impl.function(worker=view)
            except Exception as exc:
                record.errors.append(CollectorIssue(collector=impl.name,
                                                    message=f"{type(exc).__name__}: {exc}"))
        worker.previous = sample
        worker.previous_at = now
        return record
