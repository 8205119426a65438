"""The seed's telemetry collection tests: collect_all / group / instance over real workers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rbee import NotFoundError, encode
from rbee.config import CollectorSettings
from rbee.contract import on_gpu
from rbee.hive.cgroups import NoCgroup
from rbee.hive.collection import TelemetryCollector
from rbee.plugin import hookimpl
from rbee.plugin.manager import build_plugin_manager

from .conftest import busy_worker, sleeper
from .hivekit import wait_exited, wait_joined


def collector(monitor, *plugins) -> TelemetryCollector:
    manager = build_plugin_manager(extra_plugins=plugins)
    return TelemetryCollector(monitor, manager, CollectorSettings(gpu="none"))


def test_collect_all_workers_returns_all(monitor):
    pids = {monitor.spawn("llm", f"w{i}", sleeper()) for i in range(3)}
    pids.add(monitor.spawn("embed", "e0", sleeper()))
    records = collector(monitor).collect_all()
    assert {r.pid for r in records} == pids
    assert all(r.errors == [] for r in records)
    # no GPU here (injected: gpu "none"): GPU figures are absent, never 0 (so idle is unknown)
    assert all(r.gpu_util_pct is None and not on_gpu(r) for r in records)
    assert all('"gpu_util_pct":null' in encode(r).decode() for r in records)


def test_collect_group_filters_by_group(monitor):
    monitor.spawn("llm", "a", sleeper())
    monitor.spawn("embed", "b", sleeper())
    monitor.spawn("embed", "c", sleeper())
    records = collector(monitor).collect_group("embed")
    assert sorted(r.instance for r in records) == ["b", "c"]
    assert {r.group for r in records} == {"embed"}


def test_collect_instance_single_worker(monitor):
    pid = monitor.spawn("llm", "one", sleeper())
    monitor.spawn("llm", "two", sleeper())
    record = collector(monitor).collect_instance("llm", "one")
    assert (record.pid, record.group, record.instance) == (pid, "llm", "one")


def test_collect_handles_empty_cgroup(monitor):
    assert collector(monitor).collect_all() == []


def test_collect_group_nonexistent(monitor):
    monitor.spawn("llm", "a", sleeper())
    assert collector(monitor).collect_group("no-such-group") == []


def test_collect_instance_nonexistent(monitor):
    with pytest.raises(NotFoundError, match="no worker llm/ghost"):
        collector(monitor).collect_instance("llm", "ghost")


class ExplodesForOne:
    """A third-party plugin with a bug that only one worker triggers."""

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        if worker.instance == "cursed":
            raise RuntimeError("plugin bug")
        telemetry.metrics["explodes.ok"] = 1.0


def test_collect_all_workers_partial_failure(monitor):
    """Defect 7: a dying worker and a raising plugin cost one worker one field, not the tick."""
    dying = monitor.spawn("llm", "dying", sleeper())
    monitor.spawn("llm", "cursed", busy_worker())
    monitor.spawn("llm", "fine", sleeper())
    wait_joined(monitor, "llm", "cursed")  # spawn returns before the worker's helper joins
    telemetry = collector(monitor, ExplodesForOne())
    os.kill(dying, signal.SIGKILL)
    wait_exited(dying)
    records = {r.instance: r for r in telemetry.collect_all()}
    assert sorted(records) == ["cursed", "fine"]
    cursed = records["cursed"]
    assert [(e.collector, e.message) for e in cursed.errors] == [
        ("ExplodesForOne", "RuntimeError: plugin bug")]
    assert cursed.model == "test-model" and cursed.uptime_s >= 0  # the built-ins still ran
    assert cursed.rss_mb > 1.0
    assert records["fine"].errors == [] and records["fine"].metrics == {"explodes.ok": 1.0}
    encode(cursed)  # and the record still serialises


def test_collect_fallback_on_non_linux_none_backend(none_monitor):
    """Variant 1: without cgroups every figure comes from /proc of the main process."""
    none_monitor.spawn("llm", "plain", busy_worker())
    # Right after exec the interpreter has not mapped itself yet (a loaded machine read 0 MiB):
    # its RSS is read again until Python is in, at most 10 s.
    collect = collector(none_monitor)
    deadline = time.monotonic() + 10
    while (record := collect.collect_instance("llm", "plain")).rss_mb <= 1.0:
        assert time.monotonic() < deadline, "the worker's RSS never passed 1 MiB"
        time.sleep(0.02)
    assert record.limits_applied is True  # no limits were asked for


def test_collect_fallback_on_non_linux_auto_without_hierarchy(tmp_path):
    """Variant 2: a host with no cgroup filesystem mounted: "auto" picks none, quietly."""
    from rbee.hive.cgroups import select_backend

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw,relatime - proc proc rw\n")
    backend = select_backend("auto", mountinfo=str(mountinfo))
    assert isinstance(backend, NoCgroup)
