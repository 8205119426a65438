"""The third-party plugin of ``examples/rbee-plugin-example``, a distribution of its own, pip-
installed into this virtualenv (offline, without build isolation, from a copy in a temporary
directory so that nothing is written into the tree) and uninstalled afterwards. A real queen and
hive then show it: found by its entry point, its metrics in the queen's /v1/workers and stream,
its declared figures in the hive's and the queen's /metrics with their help text and unit, its
counter as a rate, its crash isolated to one worker's ``errors``, its config section checked by
``--check-config``, switched off by RBEE_DISABLE_PLUGINS, and its own unit tests (written with
``rbee.plugin.testing``) passing against the installed rbee."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_text

from rbee.plugin.manager import build_plugin_manager

from .browserkit import WORKER_KEYS, chromium, console_errors, wait_for
from .daemons import BIN
from .queenkit import open_stream
from .test_end_to_end import hive, queen, queen_workers

EXAMPLE = Path(__file__).parent.parent / "examples" / "rbee-plugin-example"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                   check=True, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    source = tmp_path_factory.mktemp("example") / "rbee-plugin-example"
    shutil.copytree(EXAMPLE, source)
    pip("install", "--no-build-isolation", "--no-deps", "--no-index", str(source))
    try:
        yield "example"
    finally:
        pip("uninstall", "--yes", "rbee-plugin-example")
        sys.modules.pop("rbee_plugin_example", None)


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        yield client


def test_found_by_its_entry_point(example_installed):
    manager = build_plugin_manager()
    assert manager.get_plugin(example_installed) is not None
    distributions = {dist.project_name for _, dist in manager.list_plugin_distinfo()}
    assert distributions == {"rbee-telemetry", "rbee-plugin-example"}


def test_the_tree_is_left_as_it_was(example_installed):
    assert sorted(p.name for p in EXAMPLE.iterdir()) == ["README.md", "pyproject.toml",
                                                          "rbee_plugin_example", "tests"]


def test_its_own_unit_tests_pass(example_installed, tmp_path):
    """The plugin's tests, as its author runs them: pytest in its tree, rbee installed."""
    tests = tmp_path / "tests"
    shutil.copytree(EXAMPLE / "tests", tests)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:benchmark", "-n", "0", str(tests)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_check_config_checks_its_section(example_installed, tmp_path):
    config = tmp_path / "hive.yaml"
    config.write_text("plugins:\n  example:\n    count_fds: maybe\n")
    bad = subprocess.run([str(BIN / "rbee-hive"), "--check-config", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == (f"rbee-hive: {config}: plugins.example: count_fds: Expected "
                                  "`bool`, got `str`")
    config.write_text("plugins:\n  example:\n    count_fds: false\n")
    good = subprocess.run([str(BIN / "rbee-hive"), "--check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "plugins: example 1.1.0" in good.stdout


def workers() -> list[dict]:
    return [{"group": "llm", "instance": "fine", "argv": SLEEPER},
            {"group": "llm", "instance": "cursed", "argv": [*SLEEPER, "--example-crash"]}]


async def test_metrics_reach_queen_and_stream_and_a_crash_costs_one_worker(
        example_installed, tmp_path, client):
    with queen(tmp_path) as q, hive(tmp_path, "example", q.url, workers()):
        async with open_stream(client, q.url) as stream:
            event = await stream.until(lambda e: {w.instance for w in getattr(e, "workers", [])
                                                  if w.rate_window_s > 0} == {"fine", "cursed"},
                                       timeout=10)
        records = {w.instance: w for w in event.workers}
        assert records["fine"].metrics["example.threads"] >= 1
        assert records["fine"].metrics["example.open_fds"] >= 3
        assert records["fine"].metrics["example.peak_rss"] > 2**20
        assert records["fine"].errors == []
        cursed = records["cursed"]
        assert [(e.collector, e.message) for e in cursed.errors] == [
            ("example", "RuntimeError: example plugin: crashing on purpose for this worker")]
        assert cursed.metrics == {} and cursed.rss_mb > 0 and cursed.uptime_s >= 0
        listed = {w["worker"]["instance"]: w["worker"] for w in await queen_workers(client, q.url)}
        assert listed["fine"]["metrics"]["example.threads"] >= 1
        assert listed["cursed"]["errors"][0]["collector"] == "example"


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith((name, f"# HELP {name} ",
                                                                     f"# TYPE {name} ",
                                                                     f"# UNIT {name} "))]


async def test_declared_figures_in_the_hive_and_queen_metrics(example_installed, tmp_path,
                                                              client):
    """Each declared figure is a family of its own, with the plugin's help and unit, labelled as
    the built-in worker families, at the hive and at the queen (which learnt the declarations
    from the heartbeat); the declared counter arrives as a rate."""
    openmetrics = {"accept": "application/openmetrics-text; version=1.0.0"}
    with queen(tmp_path) as q, hive(tmp_path, "example-metrics", q.url, workers()[:1]) as h:
        with trio.fail_after(15):
            while True:
                texts = {where: (await client.get(f"{url}/metrics", headers=openmetrics)).text
                         for where, url in (("hive", h.url), ("queen", q.url))}
                if all("rbee_plugin_example_context_switches_per_second{" in text
                       for text in texts.values()):
                    break
                await trio.sleep(0.1)
    for where, text in texts.items():
        assert metric_lines(text, "rbee_plugin_example_peak_rss_bytes")[:3] == [
            "# HELP rbee_plugin_example_peak_rss_bytes Peak resident memory of the worker's "
            "processes, summed (VmHWM) (plugin example)",
            "# TYPE rbee_plugin_example_peak_rss_bytes gauge",
            "# UNIT rbee_plugin_example_peak_rss_bytes bytes"], where
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in parse_text(text) for s in family.samples
                   if s.name.startswith("rbee_plugin_")}
        labels = (("group", "llm"), ("hive", "e2e-example-metrics"), ("instance", "fine"),
                  ("model", ""))
        assert samples[("rbee_plugin_example_threads", labels)] >= 1, where
        assert samples[("rbee_plugin_example_peak_rss_bytes", labels)] > 2**20, where
        assert samples[("rbee_plugin_example_context_switches_per_second", labels)] >= 0, where
        assert "# TYPE rbee_plugin_example_context_switches_per_second gauge" in text, where
        assert "rbee_plugin_metric" not in text, where  # every figure declared


PANEL_FIGURES = ("return [...document.querySelectorAll('#panel-plugins dt')]"
                 ".map(dt => [dt.textContent, dt.title, dt.nextElementSibling.textContent])")


def test_the_dashboard_panel_shows_its_figures_with_units(example_installed, tmp_path):
    """The worker panel lists the plugin's figures, formatted by their declared unit (bytes in
    MiB, a rate per second) with the help text as tooltip, for a hive that joined after the
    page loaded (its declarations fetched from /v1/hives/{id})."""
    from selenium.webdriver.common.keys import Keys

    with queen(tmp_path) as q, chromium(tmp_path) as driver:
        driver.get(f"{q.url}/")
        with hive(tmp_path, "example-dash", q.url, workers()[:1]):
            wait_for(driver, WORKER_KEYS, lambda keys: keys == ["e2e-example-dash/llm/fine"])
            driver.execute_script("document.querySelector('.row[data-key=\"e2e-example-dash/llm/"
                                  "fine\"]').focus()")
            driver.switch_to.active_element.send_keys(Keys.ENTER)
            shown = wait_for(driver, PANEL_FIGURES, lambda rows: len(rows) == 4
                             and all(title for _, title, _ in rows), timeout=15)
            assert console_errors(driver) == []
    figures = {key: (title, text) for key, title, text in shown}
    assert figures["example.threads"][0] == "Threads of the worker's processes"
    assert int(figures["example.threads"][1]) >= 1
    assert figures["example.peak_rss"][1].endswith(" MiB")
    assert figures["example.context_switches"][1].endswith("/s")


async def test_disabled_by_environment(example_installed, tmp_path, client):
    env = {**os.environ, "RBEE_DISABLE_PLUGINS": "example"}
    with queen(tmp_path) as q, hive(tmp_path, "no-example", q.url, workers(), env=env):
        with trio.fail_after(10):
            while len(listed := await queen_workers(client, q.url)) != 2 or not all(
                    w["worker"].get("rate_window_s", 0) > 0 for w in listed):
                await trio.sleep(0.05)
    for worker in listed:
        assert "metrics" not in worker["worker"] and "errors" not in worker["worker"], worker
