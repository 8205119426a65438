"""The third-party plugin of ``examples/rbee-plugin-example``, a distribution of its own, pip-
installed into this virtualenv (offline, without build isolation, from a copy in a temporary
directory so that nothing is written into the tree) and uninstalled afterwards. A real queen and
hive then show it: found by its entry point, its metrics in the queen's /v1/workers and stream,
its crash isolated to one worker's ``errors``, and switched off by RBEE_DISABLE_PLUGINS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from rbee.plugin.manager import build_plugin_manager

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
                                                          "rbee_plugin_example"]


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
        assert records["fine"].errors == []
        cursed = records["cursed"]
        assert [(e.collector, e.message) for e in cursed.errors] == [
            ("example", "RuntimeError: example plugin: crashing on purpose for this worker")]
        assert cursed.metrics == {} and cursed.rss_mb > 0 and cursed.uptime_s >= 0
        listed = {w["worker"]["instance"]: w["worker"] for w in await queen_workers(client, q.url)}
        assert listed["fine"]["metrics"]["example.threads"] >= 1
        assert listed["cursed"]["errors"][0]["collector"] == "example"


async def test_disabled_by_environment(example_installed, tmp_path, client):
    env = {**os.environ, "RBEE_DISABLE_PLUGINS": "example"}
    with queen(tmp_path) as q, hive(tmp_path, "no-example", q.url, workers(), env=env):
        with trio.fail_after(10):
            while len(listed := await queen_workers(client, q.url)) != 2 or not all(
                    w["worker"].get("rate_window_s", 0) > 0 for w in listed):
                await trio.sleep(0.05)
    for worker in listed:
        assert "metrics" not in worker["worker"] and "errors" not in worker["worker"], worker
