"""The public plugin API: its names and hook signatures pinned (a change must be deliberate and
bump API_VERSION), documented in docs/plugins.md with their exact signatures, called through pluggy one
plugin at a time (tracing sees every call), wrappers refused, and a per-tick budget per plugin."""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path

import httpx
import pluggy
import pytest

import rbee.plugin
from rbee import PluginError
from rbee.config import CollectorSettings
from rbee.hive.collection import TelemetryCollector
from rbee.plugin import API_VERSION, WorkerView, hookimpl, spec
from rbee.plugin.manager import build_plugin_manager

from .conftest import sleeper
from .hivekit import wait_joined, wait_mapped

GUIDE = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()

PUBLIC = ["API_VERSION", "CollectorIssue", "CollectorSettings", "ENTRY_POINT_GROUP", "GpuDevice",
          "MetricKind", "MetricSpec", "PROJECT", "PluginInfo", "PluginSettings", "StatSample",
          "WorkerGpuUse", "WorkerTelemetry", "WorkerView", "hookimpl", "hookspec"]
HOOKS = {
    "rbee_collector_setup":
        "(settings: 'CollectorSettings', plugin_manager: 'pluggy.PluginManager', "
        "config: 'msgspec.Struct | None') -> 'None'",
    "rbee_declare_metrics": "() -> 'Sequence[MetricSpec]'",
    "rbee_plugin_settings": "() -> 'type[msgspec.Struct]'",
    "rbee_collector_teardown": "() -> 'None'",
    "rbee_refresh_devices": "() -> 'list[GpuDevice]'",
    "rbee_sample_devices": "() -> 'None'",
    "rbee_refresh_workers": "(workers: 'Sequence[WorkerView]', http: 'httpx.AsyncClient') "
                            "-> 'Awaitable[None] | None'",
    "rbee_collect_worker": "(worker: 'WorkerView', telemetry: 'WorkerTelemetry') -> 'None'",
}
VIEW = ["argv", "cgroup_path", "cgroup_paths", "cpu_limit_pct", "elapsed_s", "gpu_indices", "group", "instance",
        "limits_applied", "memory_limit_mb", "metrics_url", "pid", "pids", "previous", "sample",
        "start_boottime_s", "state"]


def test_the_public_surface_is_pinned():
    assert API_VERSION == "1.1"
    assert sorted(rbee.plugin.__all__) == PUBLIC
    assert sorted(spec.__all__) == sorted(HOOKS)
    for name, signature in HOOKS.items():
        assert str(inspect.signature(getattr(spec, name))) == signature, name
    assert sorted(n for n in dir(WorkerView) if not n.startswith("_")) == VIEW


def test_the_guide_documents_each_hook_with_its_exact_signature():
    for name, signature in HOOKS.items():
        written = f"def {name}{signature.replace(chr(39), '')}"
        assert written in GUIDE, written
    assert "rbee.plugin.API_VERSION" in GUIDE and f'"{API_VERSION}"' in GUIDE


def test_the_view_is_read_only():
    view = WorkerView(group="g", instance="i", pid=1, argv=("x",), cgroup_path=None,
                      start_ticks=-1, cpu_limit_pct=None, memory_limit_mb=None,
                      limits_applied=True, gpu_indices=(), metrics_url=None, pids=list)
    with pytest.raises(AttributeError):
        view.pid = 2
    with pytest.raises(AttributeError):
        view.extra = 1
    with pytest.raises(RuntimeError, match="inside a collection tick"):
        _ = view.sample


class Recorder:
    """A plugin that keeps what it was shown, and counts ticks in its state slot."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        slot = worker.state("recorder")
        slot["ticks"] = slot.get("ticks", 0) + 1
        self.seen.append({name: getattr(worker, name) for name in (
            "group", "instance", "pid", "argv", "cgroup_path", "start_boottime_s",
            "cpu_limit_pct", "memory_limit_mb", "limits_applied", "gpu_indices", "metrics_url",
            "elapsed_s")} | {"pids": worker.pids(), "ticks": slot["ticks"],
                             "other_slot": worker.state("someone-else")})


def test_the_view_shows_the_worker(cgroup_monitor):
    pid = cgroup_monitor.spawn("llm", "seen", sleeper(), cpu_limit="50%", memory_limit="64M",
                               env={"CUDA_VISIBLE_DEVICES": "1,3", "PATH": os.environ["PATH"]},
                               metrics_url="http://127.0.0.1:9/metrics")
    wait_joined(cgroup_monitor, "llm", "seen")  # spawn returns before the worker's helper joins
    recorder = Recorder()
    collector = TelemetryCollector(cgroup_monitor, build_plugin_manager(extra_plugins=[recorder]),
                                   CollectorSettings(gpu="none", rate_window_s=0))
    collector.collect_all()
    collector.collect_all()
    first, second = recorder.seen
    assert (first["group"], first["instance"], first["pid"], first["argv"]) == (
        "llm", "seen", pid, tuple(sleeper()))
    assert first["cgroup_path"].endswith("/llm/seen") and os.path.isdir(first["cgroup_path"])
    assert 0 < first["start_boottime_s"] <= time.clock_gettime(time.CLOCK_BOOTTIME)
    assert (first["cpu_limit_pct"], first["memory_limit_mb"]) == (50.0, 64.0)
    assert first["limits_applied"] is cgroup_monitor.get("llm", "seen").limits_applied
    assert first["gpu_indices"] == (1, 3)
    assert first["metrics_url"] == "http://127.0.0.1:9/metrics"
    assert first["pids"] == [pid]
    assert (first["ticks"], second["ticks"]) == (1, 2)  # the slot lasts across ticks
    assert first["other_slot"] == {}  # and is the plugin's own
    assert first["elapsed_s"] == 0.0 and second["elapsed_s"] > 0


class Wrapper:
    @hookimpl(wrapper=True)
    def rbee_collect_worker(self, worker, telemetry):
        return (yield)


class OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def rbee_collect_worker(self, worker, telemetry):
        yield


@pytest.mark.parametrize("plugin", [Wrapper(), OldStyleWrapper()], ids=["wrapper", "hookwrapper"])
def test_wrappers_are_refused_at_registration(plugin):
    with pytest.raises(PluginError, match=rf"plugin '{type(plugin).__name__}': "
                                          "rbee_collect_worker is declared as a hook wrapper") as e:
        build_plugin_manager(extra_plugins=[plugin])
    assert (e.value.plugin, e.value.hook) == (type(plugin).__name__, "rbee_collect_worker")


class UnknownHook:
    @hookimpl
    def rbee_collect_wroker(self, worker, telemetry):
        pass


def test_an_unknown_hook_is_refused_by_name():
    with pytest.raises(PluginError, match="plugin 'UnknownHook' implements "
                                          "'rbee_collect_wroker', which is no rbee hook") as e:
        build_plugin_manager(extra_plugins=[UnknownHook()])
    assert (e.value.plugin, e.value.hook) == ("UnknownHook", "rbee_collect_wroker")


def test_every_call_goes_through_pluggy_one_plugin_at_a_time(none_monitor):
    none_monitor.spawn("llm", "a", sleeper())
    none_monitor.spawn("llm", "b", sleeper())
    manager = build_plugin_manager()
    calls: list[tuple[str, tuple[str, ...]]] = []
    manager.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append((name, tuple(i.plugin_name for i in impls))),
        lambda outcome, name, impls, kwargs: None)
    TelemetryCollector(none_monitor, manager, CollectorSettings(gpu="none")).collect_all()
    per_worker = [plugins for name, plugins in calls if name == "rbee_collect_worker"]
    assert len(per_worker) == 2 * 3 and all(len(plugins) == 1 for plugins in per_worker)
    assert sorted({plugins[0] for plugins in per_worker}) == ["cgroup", "engine.scraper",
                                                             "process"]


class OwnOrder:
    """Takes the per-worker hook's arguments in its own order, and one of them alone."""

    @hookimpl
    def rbee_collect_worker(self, telemetry, worker) -> None:
        telemetry.metrics["own.order"] = float(worker.pid == telemetry.pid)


class TelemetryOnly:
    @hookimpl(trylast=True)
    def rbee_collect_worker(self, telemetry) -> None:
        telemetry.metrics["only.telemetry"] = telemetry.metrics.get("own.order", -1.0)


def test_direct_calls_and_monitored_calls_give_the_same_records(none_monitor):
    """Unmonitored, the per-worker hook calls each implementation as pluggy's loop would (its
    arguments by name, in its order; pluggy's order of plugins); monitored, through pluggy's
    caller. Both give the same records."""
    none_monitor.spawn("llm", "a", sleeper())
    plugins = [OwnOrder(), TelemetryOnly()]
    direct = build_plugin_manager(extra_plugins=plugins)
    assert direct.monitors == 0
    monitored = build_plugin_manager(extra_plugins=plugins)
    undo = monitored.add_hookcall_monitoring(lambda *args: None, lambda *args: None)
    assert monitored.monitors == 1
    records = [TelemetryCollector(none_monitor, manager, CollectorSettings(gpu="none"))
               .collect_instance("llm", "a") for manager in (direct, monitored)]
    for record in records:
        assert record.metrics == {"own.order": 1.0, "only.telemetry": 1.0}
        assert record.rss_mb > 0 and record.errors == []  # the built-ins ran too
    undo()
    assert monitored.monitors == 0


def test_trace_logs_each_hook_call_with_its_duration(none_monitor, monkeypatch, caplog):
    none_monitor.spawn("llm", "traced", sleeper())
    monkeypatch.setenv("RBEE_TRACE_PLUGINS", "1")
    collector = TelemetryCollector(none_monitor, build_plugin_manager(),
                                   CollectorSettings(gpu="none"))
    with caplog.at_level(logging.INFO, logger="rbee.plugin.trace"):
        collector.collect_all()
    lines = [r.getMessage() for r in caplog.records if r.name == "rbee.plugin.trace"]
    traced = [line for line in lines if line.startswith("rbee_collect_worker[process] llm/traced ")]
    assert len(traced) == 1 and traced[0].endswith(" ms"), lines
    assert float(traced[0].split()[-2]) >= 0
    logging.getLogger("rbee.plugin.trace").setLevel(logging.NOTSET)


class Slow:
    """A plugin that takes 30 ms a worker: with a 50 ms budget, two workers a tick."""

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        time.sleep(0.03)
        telemetry.metrics["slow.done"] = 1.0


def test_a_plugin_over_its_budget_is_skipped_for_the_rest_of_the_tick(none_monitor):
    for index in range(8):
        wait_mapped(none_monitor.spawn("llm", f"w{index}", sleeper()))  # RSS > 0 from here
    collector = TelemetryCollector(none_monitor, build_plugin_manager(extra_plugins=[Slow()]),
                                   CollectorSettings(gpu="none", plugin_budget_ms=50))
    for _ in range(2):  # every tick starts with a fresh budget
        started = time.perf_counter()
        records = collector.collect_all()
        took = time.perf_counter() - started
        assert took < 0.15, f"{took:.3f}s (8 x 30 ms unbounded would be 0.24 s)"
        done = [r for r in records if r.metrics == {"slow.done": 1.0}]
        skipped = [r for r in records if r.metrics == {}]
        assert len(done) == 2 and len(skipped) == 6
        for record in skipped:
            (issue,) = record.errors
            assert issue.collector == "Slow"
            assert issue.message.startswith("skipped: over its 50 ms budget this tick (")
            assert record.model is None and record.rss_bytes > 0  # the other plugins still ran
        assert list(collector.over_budget) == ["Slow"] and collector.over_budget["Slow"] >= 50


class Refreshing:
    """An async refresh that stores per-worker results the per-worker hook reads, and fails for
    one whole call when told to."""

    fail = False

    @hookimpl
    async def rbee_refresh_workers(self, workers, http):
        if self.fail:
            raise ConnectionError("backend down")
        for worker in workers:
            worker.state("refreshing")["value"] = float(worker.pid)

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        if "value" in worker.state("refreshing"):
            telemetry.metrics["refreshing.pid"] = worker.state("refreshing")["value"]


async def test_async_refresh_feeds_the_per_worker_hook(none_monitor):
    pid = none_monitor.spawn("llm", "a", sleeper())
    plugin = Refreshing()
    collector = TelemetryCollector(none_monitor, build_plugin_manager(extra_plugins=[plugin]),
                                   CollectorSettings(gpu="none"))
    async with httpx.AsyncClient() as http:
        await collector.refresh_workers(http, deadline_s=1.0)
        assert collector.collect_all()[0].metrics == {"refreshing.pid": float(pid)}
        plugin.fail = True
        await collector.refresh_workers(http, deadline_s=1.0)
    assert [(i.collector, i.message) for i in collector.worker_refresh_errors] == [
        ("Refreshing", "ConnectionError: backend down")]


def test_pluggy_is_what_calls_the_hooks():
    assert isinstance(build_plugin_manager(), pluggy.PluginManager)
