"""Run a collector plugin in a unit test as the hive runs it, in a few lines (what pytest's
``pytester`` is to pytest plugins)::

    from rbee.plugin.testing import PluginHarness
    import my_plugin

    def test_threads_and_switches_per_second():
        harness = PluginHarness(my_plugin, name="mine", config={"max_threads": 64})
        worker = harness.worker()                 # this process, with defaults for the rest
        harness.collect(worker)                   # first reading: a rate has no window yet
        harness.clock.advance(1.0)
        record = harness.collect(worker)
        assert record.metrics["mine.threads"] >= 1
        assert record.metrics["mine.switches"] >= 0   # declared as_rate: per second

``PluginHarness`` does what the hive does with a plugin, with the same code: its declarations
and its ``plugins:`` section are checked (a ``PluginError`` or ``ConfigError`` as at start-up),
its setup gets its config, and each ``collect`` advances the worker's view by the harness's
clock, calls the per-worker hook and turns declared counters into rates. Unlike the hive it lets
an exception from the plugin through, so that the test shows its traceback (the hive records it
in the worker's ``errors``). ``worker_view`` and ``worker_telemetry`` make the two objects a hook
receives, every field defaulted, for a test that calls the hook function itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import httpx

from .._sample import StatSample
from ..config import CollectorSettings
from ..contract import MetricSpec, WorkerTelemetry
from ._view import WorkerView
from .declarations import configure_plugins, describe_plugins, rate_keys
from .manager import PluginHooks, RbeePluginManager, refuse_unknown_hooks
from .rates import CounterRates

__all__ = ["Clock", "PluginHarness", "stat_sample", "worker_telemetry", "worker_view"]


class Clock:
    """A monotonic clock that moves only when told: ``advance(seconds)``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


def stat_sample(**fields: int) -> StatSample:
    """A worker's raw counters, zero but for ``fields`` (its process sleeping, ``S``)."""
    defaults = dict.fromkeys(StatSample._fields, 0)
    defaults["proc_state"] = ord("S")
    return StatSample(**{**defaults, **fields})


def worker_view(**fields: Any) -> WorkerView:
    """A ``WorkerView`` of this test's own process unless ``fields`` say otherwise (any keyword
    of ``WorkerView``; ``pids`` defaults to the one ``pid``)."""
    pid = fields.get("pid", os.getpid())
    defaults: dict[str, Any] = dict(
        group="test", instance="w0", pid=pid, argv=("python", "-m", "worker"), cgroup_path=None,
        start_ticks=-1, cpu_limit_pct=None, memory_limit_mb=None, limits_applied=True,
        gpu_indices=(), metrics_url=None, pids=lambda: [pid], cgroup_paths=None)
    return WorkerView(**{**defaults, **fields})


def worker_telemetry(**fields: Any) -> WorkerTelemetry:
    """A worker's record as the hive starts it before the plugins run, with ``fields`` set."""
    defaults: dict[str, Any] = dict(
        pid=os.getpid(), group="test", instance="w0", cpu_pct=0.0, rss_mb=0, io_r_mb_s=0.0,
        io_w_mb_s=0.0, uptime_s=0, gpu_util_pct=None, vram_mb=0, total_vram_mb=0, model=None)
    return WorkerTelemetry(**{**defaults, **fields})


class PluginHarness:
    """One plugin (a module or an object with ``@hookimpl`` functions) registered as ``name``
    (its entry-point name: the prefix of its ``metrics`` keys; default its ``__name__``)."""

    def __init__(self, plugin: object, name: str | None = None,
                 config: Mapping[str, Any] | None = None,
                 settings: CollectorSettings | None = None) -> None:
        self.name = name or getattr(plugin, "__name__", type(plugin).__name__)
        self.settings = settings or CollectorSettings(gpu="none")
        self.clock = Clock()
        self.manager = RbeePluginManager()
        self.manager.register(plugin, name=self.name)
        refuse_unknown_hooks(self.manager)
        infos = describe_plugins(self.manager)
        self.declared: dict[str, MetricSpec] = {
            f"{info.name}.{spec.name}": spec for info in infos for spec in info.metrics}
        """The plugin's declarations by ``metrics`` key."""
        self.config = configure_plugins(
            self.manager, {} if config is None else {self.name: dict(config)}).get(self.name)
        """Its validated ``plugins:`` section (None when it takes none)."""
        self.rates = CounterRates(rate_keys(infos), self.settings.rate_window_s)
        self.manager.hook.rbee_collector_setup(settings=self.settings, plugin_manager=self.manager,
                                               config=self.config)
        self._last: dict[int, tuple[float, StatSample]] = {}
        self._default: WorkerView | None = None

    def worker(self, **fields: Any) -> WorkerView:
        """``worker_view(**fields)``."""
        return worker_view(**fields)

    def collect(self, worker: WorkerView | None = None, sample: StatSample | None = None
                ) -> WorkerTelemetry:
        """One tick for ``worker`` (default: one view of this process the harness keeps): its
        view advanced to ``sample`` (default ``stat_sample()``) at the clock's time, the
        per-worker hook called, declared counters made rates."""
        if worker is None:
            worker = self._default = self._default or self.worker()
        sample = sample or stat_sample()
        now = self.clock()
        last = self._last.get(id(worker))
        previous, elapsed = (None, 0.0) if last is None or now <= last[0] else (
            last[1], now - last[0])
        worker._advance(sample, previous, elapsed)
        self._last[id(worker)] = (now, sample)
        record = worker_telemetry(pid=worker.pid, group=worker.group, instance=worker.instance)
        for _, call in PluginHooks(self.manager).per_worker():
            call(worker, record)
        self.rates.apply(worker, now, record.metrics)
        return record

    async def refresh_workers(self, workers: Sequence[WorkerView],
                              http: httpx.AsyncClient | None = None) -> None:
        """Await the plugin's ``rbee_refresh_workers`` once (with a client of its own unless
        ``http`` is given), as the hive's refresh loop does."""
        async with httpx.AsyncClient(timeout=5.0) if http is None else nullcontext(http) as client:
            for pending in self.manager.hook.rbee_refresh_workers(workers=list(workers),
                                                                  http=client):
                if pending is not None:
                    await pending

    def close(self) -> None:
        self.manager.hook.rbee_collector_teardown()
