"""The plugin kit: a plugin that fails to load is one line naming it, its distribution and how
to turn it off (at start-up and by ``--check-config``); ``plugins:`` sections validated by the
plugin's own struct; declarations checked; declared counters made rates by the hive, over the
built-in rates' window; the over-budget warning once a minute; dropped metric keys named; the
plugins a hive loaded logged; cgroup paths for every controller.

Plugins that must be found through an entry point are real distributions: a ``.dist-info``
directory beside a module, on ``sys.path`` (``PYTHONPATH`` for a subprocess), as pip would leave
them, without installing anything into the test environment."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbee import ConfigError, PluginError
from rbee.config import CollectorSettings, HiveConfig
from rbee.contract import CollectorIssue, MetricSpec
from rbee.hive.cgroups.v1 import CgroupV1
from rbee.hive.collection import WARN_EVERY_S, TelemetryCollector
from rbee.hive.fitting import fit_worker
from rbee.hive.main import check_plugins
from rbee.plugin import PluginSettings, hookimpl
from rbee.plugin.declarations import configure_plugins, declared_metrics, describe_plugins
from rbee.plugin.manager import build_plugin_manager
from rbee.plugin.testing import Clock, worker_telemetry

from .conftest import sleeper
from .daemons import BIN
from .hivekit import wait_joined

GOOD = '''
from rbee.plugin import MetricSpec, PluginSettings, hookimpl

class Settings(PluginSettings):
    limit: int = 10

@hookimpl
def rbee_plugin_settings():
    return Settings

@hookimpl
def rbee_declare_metrics():
    return [MetricSpec(name="items", help="Items")]
'''


def distribution(where: Path, dist: str, version: str, entry: str, module: str, code: str
                 ) -> Path:
    """A distribution as pip installs it: ``module.py`` and its ``.dist-info`` with an
    ``rbee.collectors`` entry point named ``entry``."""
    (where / f"{module}.py").write_text(code)
    info = where / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[rbee.collectors]\n{entry} = {module}\n")
    return where


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path for distributions made by ``distribution``; their modules are
    forgotten afterwards."""
    where = tmp_path / "site"
    where.mkdir()
    monkeypatch.syspath_prepend(str(where))
    before = set(sys.modules)
    yield where
    for name in set(sys.modules) - before:
        if name.startswith("kit_"):
            del sys.modules[name]


def hive_check(config: Path, site: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rbee-hive"), "--check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(site), **env})


BROKEN_LINE = ("rbee-hive: plugin 'broken' (distribution rbee-broken 0.3) failed to load: "
               "ModuleNotFoundError: No module named 'not_installed_anywhere'; turn it off with "
               "RBEE_DISABLE_PLUGINS=broken or, in hive.yaml, collect: {disabled_plugins: "
               "[broken]}")


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(site, tmp_path):
    distribution(site, "rbee-broken", "0.3", "broken", "kit_broken",
                 "import not_installed_anywhere\n")
    config = tmp_path / "hive.yaml"
    config.write_text("collect: {gpu: none}\n")
    checked = hive_check(config, site)
    assert checked.returncode != 0 and checked.stdout == ""
    assert checked.stderr.splitlines() == [BROKEN_LINE]
    started = subprocess.run([str(BIN / "rbee-hive"), "--config", str(config)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(site)})
    assert started.returncode != 0 and started.stderr.splitlines() == [BROKEN_LINE]
    off = hive_check(config, site, RBEE_DISABLE_PLUGINS="broken")
    assert off.returncode == 0, off.stderr
    config.write_text("collect: {gpu: none, disabled_plugins: [broken]}\n")
    assert hive_check(config, site).returncode == 0


def test_check_config_loads_plugins_and_checks_their_sections(site, tmp_path):
    distribution(site, "rbee-good", "2.0", "good", "kit_good", GOOD)
    config = tmp_path / "hive.yaml"
    config.write_text("collect: {gpu: none}\nplugins: {good: {limit: 3}}\n")
    ok = hive_check(config, site)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith(", plugins: good 2.0")
    config.write_text("plugins: {good: {limit: lots}}\n")
    bad = hive_check(config, site)
    assert bad.returncode == 2
    assert bad.stderr == (f"rbee-hive: {config}: plugins.good: limit: Expected `int`, got "
                          "`str`\n")
    config.write_text("plugins: {goood: {limit: 3}}\n")
    typo = hive_check(config, site)
    assert typo.returncode == 2
    assert typo.stderr.startswith(f"rbee-hive: {config}: plugins.goood: no plugin 'goood' is "
                                  "installed (did you mean 'good'?); installed: ")


def test_sections_unknown_refused_disabled_ignored_defaults_filled(site):
    distribution(site, "rbee-good", "2.0", "good", "kit_good", GOOD)
    manager = build_plugin_manager()
    configs = configure_plugins(manager, {}, "hive.yaml")
    assert configs["good"].limit == 10 and configs["process"] is None
    assert configure_plugins(manager, {"good": None})["good"].limit == 10  # `good:` left empty
    with pytest.raises(ConfigError, match=r"^hive.yaml: plugins.good: unknown field `limt`; "
                                          r"did you mean `limit`\?$"):
        configure_plugins(manager, {"good": {"limt": 1}}, "hive.yaml")
    with pytest.raises(ConfigError, match=r"^plugins.process: plugin 'process' takes no "
                                          r"settings"):
        configure_plugins(manager, {"process": {"x": 1}})
    off = build_plugin_manager(disabled=["good"])
    assert "good" not in configure_plugins(off, {"good": {"limit": "not checked"}})
    assert check_plugins(HiveConfig(plugins={"good": {"limit": 1}})) == "good 2.0"


def test_setup_gets_each_plugin_its_own_config(none_monitor):
    seen = {}

    class Settings(PluginSettings):
        level: int = 1

    class Configured:
        @hookimpl
        def rbee_plugin_settings(self):
            return Settings

        @hookimpl
        def rbee_collector_setup(self, config):
            seen["configured"] = config

    class Plain:
        @hookimpl
        def rbee_collector_setup(self, settings, config):
            seen["plain"] = (settings.gpu, config)

    manager = build_plugin_manager(extra_plugins=[Configured(), Plain()])
    TelemetryCollector(none_monitor, manager, CollectorSettings(gpu="none"),
                       plugin_config={"Configured": {"level": 3}})
    assert seen == {"configured": Settings(level=3), "plain": ("none", None)}


@pytest.mark.parametrize(("declared", "problem"), [
    ([{"name": "x", "kind": "histogram"}], "Invalid enum value 'histogram'"),
    ([MetricSpec(name="bad name")], "bad metric"),
    ([MetricSpec(name="x"), MetricSpec(name="x")], "metric 'x' is declared twice"),
    ([MetricSpec(name="x" * 60)], "longer than 64 characters"),
    ([MetricSpec(name="x", as_rate=True)], "is a gauge: only a counter can be as_rate"),
    ([MetricSpec(name="x", unit="Bytes")], "bad metric"),
])
def test_bad_declarations_name_the_plugin(declared, problem):
    with pytest.raises(PluginError, match=f"^plugin 'mine'.*{problem}") as caught:
        declared_metrics("mine", declared)
    assert caught.value.plugin == "mine"


def test_declarations_described_with_the_distribution(site):
    distribution(site, "rbee-good", "2.0", "good", "kit_good", GOOD)
    (info,) = describe_plugins(build_plugin_manager())  # the built-ins are not described
    assert (info.name, info.distribution, info.version) == ("good", "rbee-good", "2.0")
    assert info.metrics == [MetricSpec(name="items", help="Items")]


class Counting:
    """Declares a counter as a rate and a plain counter; counts 10 a tick, or what it is told."""

    next_value: float | None = None

    @hookimpl
    def rbee_declare_metrics(self):
        return [MetricSpec(name="events", kind="counter", as_rate=True),
                MetricSpec(name="total", kind="counter")]

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        state = worker.state("counting")
        state["n"] = self.next_value if self.next_value is not None else state.get("n", -10) + 10
        telemetry.metrics["Counting.events"] = state["n"]
        telemetry.metrics["Counting.total"] = state["n"]


def test_declared_counters_become_rates_over_the_rate_window(none_monitor):
    none_monitor.spawn("llm", "counted", sleeper())
    clock, plugin = Clock(), Counting()
    collector = TelemetryCollector(
        none_monitor, build_plugin_manager(extra_plugins=[plugin]),
        CollectorSettings(gpu="none", rate_window_s=1.0), clock=clock)
    rates = []
    for _ in range(5):
        (record,) = collector.collect_all()
        rates.append(record.metrics.get("Counting.events"))
        assert record.metrics["Counting.total"] == 10 * (len(rates) - 1)  # a plain counter as is
        clock.advance(0.5)
    # t=0 and t=0.5 have no reading a second old; then each rate spans the newest reading at
    # least a second old (10 counts per half second: 20 per second).
    assert rates == [None, None, 20.0, 20.0, 20.0]
    plugin.next_value = 5.0  # the counter went back (its process restarted): no rate
    (record,) = collector.collect_all()
    assert "Counting.events" not in record.metrics
    assert collector.plugin_infos[0].name == "Counting"


class Busy:
    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        started = time.perf_counter()
        while time.perf_counter() - started < 0.002:
            pass


def test_the_over_budget_warning_is_logged_once_a_minute(none_monitor, caplog):
    none_monitor.spawn("llm", "busy", sleeper())
    clock = Clock()
    collector = TelemetryCollector(none_monitor, build_plugin_manager(extra_plugins=[Busy()]),
                                   CollectorSettings(gpu="none", plugin_budget_ms=0.5),
                                   clock=clock)
    with caplog.at_level(logging.WARNING, logger="rbee.hive.collection"):
        for _ in range(12):
            collector.collect_all()
            assert list(collector.over_budget) == ["Busy"]  # still skipped every tick
            clock.advance(1.0)
        clock.advance(WARN_EVERY_S)
        collector.collect_all()
    lines = [r.getMessage() for r in caplog.records if "over its" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("plugin Busy took ") and "0.5 ms budget" in lines[0]
    assert lines[1].endswith("(11 more ticks over budget in the last 72 s)")


def test_the_loaded_plugins_are_logged(none_monitor, caplog, site):
    distribution(site, "rbee-good", "2.0", "good", "kit_good", GOOD)
    with caplog.at_level(logging.INFO, logger="rbee.hive.collection"):
        TelemetryCollector(none_monitor, build_plugin_manager(extra_plugins=[Busy()]),
                           CollectorSettings(gpu="none"))
    (line,) = [r.getMessage() for r in caplog.records if "collector plugins" in r.getMessage()]
    assert "good (rbee-good 2.0)" in line and "Busy (registered directly)" in line
    assert "process (rbee-telemetry " in line


def test_the_contract_error_names_the_dropped_keys():
    record = worker_telemetry(metrics={"ok.one": 1.0, "bad key": 2.0, "x" * 70: 3.0,
                                       "nan.value": float("nan")})
    fit_worker(record)
    assert record.metrics == {"ok.one": 1.0}
    assert record.errors == [CollectorIssue(collector="contract", message=(
        f"3 metrics dropped: 'bad key', '{'x' * 70}', 'nan.value' (at most 64, keys of 64 "
        "characters ^[A-Za-z0-9_.:-]+$, finite values)"))]


def test_cgroup_v1_gives_a_path_for_every_controller():
    """The v1 backend's own mapping (pure: no hierarchy is touched to compute it)."""
    mounts = {c: Path(f"/sys/fs/cgroup/{c}") for c in ("cpu", "cpuacct", "memory", "blkio")}
    backend = CgroupV1(mounts, "rbee.slice/h1")
    assert backend.cgroup_paths("llm", "a") == {
        c: f"/sys/fs/cgroup/{c}/rbee.slice/h1/llm/a" for c in mounts}


class Paths:
    """Keeps each worker's ``cgroup_paths``, as a plugin reading a controller's files would."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {}

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        self.seen[worker.instance] = dict(worker.cgroup_paths)


def test_the_view_has_the_workers_directory_for_each_controller(monitor):
    """On the real kernel, each backend: every path listed is a directory holding the worker
    (v1: one per hierarchy, cpu and memory among them; v2: the worker's one directory under
    each controller enabled there; none: nothing)."""
    monitor.spawn("llm", "paths", sleeper())
    wait_joined(monitor, "llm", "paths")  # spawn returns before the worker's helper joins
    worker = monitor.get("llm", "paths")
    plugin = Paths()
    TelemetryCollector(monitor, build_plugin_manager(extra_plugins=[plugin]),
                       CollectorSettings(gpu="none")).collect_all()
    paths = plugin.seen["paths"]
    kind = monitor.backend.name
    if kind == "none":
        assert paths == {}
        return
    if kind == "v1":
        assert {"cpu", "cpuacct", "memory"} <= set(paths)
        assert len(set(paths.values())) == len(paths)  # a hierarchy each
    else:  # the controllers the hive enabled in its root (none on a controller-less mount)
        assert paths == dict.fromkeys(sorted(monitor.backend.enabled), worker.cgroup_path)
    for path in paths.values():
        assert str(worker.pid) in Path(path, "cgroup.procs").read_text().split(), path
