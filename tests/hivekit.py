"""A real hive inside the test's trio nursery: the product's HiveAgent (real workers in real cgroups
under this run's root) and, where a queen is given, its HeartbeatSender."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

import trio

from rbee.config import HiveConfig, parse_config
from rbee.hive import processes
from rbee.hive.agent import HiveAgent
from rbee.hive.heartbeat import HeartbeatSender
from rbee.hive.processes import ProcessMonitor
from rbee.hive.procfs import read_cmdline

from .conftest import RUN_ROOT, sleeper


def hive_config(tag: str, **settings: object) -> HiveConfig:
    """A hive config for tests: workers are stopped and the cgroup root removed on exit, no GPU.
    ``settings`` are YAML-shaped overrides (``heartbeat={"interval_s": 0.2}``)."""
    base: dict[str, object] = {
        "id": "hive-test", "stop_workers_on_exit": True,
        "cgroup": {"root": f"{RUN_ROOT}/{tag}"}, "collect": {"gpu": "none"},
    }
    base.update(settings)
    return parse_config(base, HiveConfig, "<test>")


def wait_exited(pid: int, timeout_s: float = 10.0) -> None:
    """Block until the process ``pid`` has exited (its pidfd polls readable), without reaping
    it: the hive's own reap is what a test checks."""
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    assert readable, f"process {pid} did not exit within {timeout_s:g}s"


def resident_pages(pid: int) -> int:
    """The RSS field of /proc/<pid>/stat, the one the none backend's collector reads."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[21])


def wait_mapped(pid: int, timeout_s: float = 10.0) -> None:
    """Block until a freshly spawned process shows pages resident in /proc/<pid>/stat: right
    after exec its RSS reads 0 there (the kernel folds its per-thread RSS counts in later), which
    a test of RSS figures must not mistake for a bug."""
    deadline = time.monotonic() + timeout_s
    while resident_pages(pid) == 0:
        assert time.monotonic() < deadline, f"process {pid} never had a page resident"
        time.sleep(0.005)


def wait_joined(monitor: ProcessMonitor, group: str, instance: str, timeout_s: float = 10.0
                ) -> int:
    """Block until the worker runs its own program in its cgroup, and return its PID: ``spawn``
    returns while the worker's helper is still joining (``rbee/hive/processes.py``)."""
    worker = monitor.get(group, instance)
    deadline = time.monotonic() + timeout_s
    while (worker.pid not in monitor.backend.members(group, instance)
           or read_cmdline(worker.pid)[:3] in ((), (processes.SHELL, "-c",  # () in exec
                                                    processes.JOIN_THEN_EXEC))):
        assert time.monotonic() < deadline, f"{group}/{instance} never joined its cgroup"
        time.sleep(0.002)
    return worker.pid


def wait_for_text(path: str, text: str, timeout_s: float = 10.0) -> None:
    """Block until the file at ``path`` contains ``text`` (a worker saying it is ready)."""
    deadline = time.monotonic() + timeout_s
    while not (os.path.exists(path) and text in Path(path).read_text()):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.01)


def sleeper_specs(count: int) -> list[dict[str, object]]:
    return [{"group": "llm", "instance": f"w{i}", "argv": sleeper()} for i in range(count)]


async def start_hive(nursery: trio.Nursery, config: HiveConfig, queen_url: str | None = None,
                     **sender_options) -> tuple[HiveAgent, HeartbeatSender | None]:
    agent = HiveAgent(config)
    await nursery.start(agent.run)
    sender = None
    if queen_url is not None:
        sender = HeartbeatSender(config.heartbeat, queen_url, agent, **sender_options)
        await nursery.start(sender.run)
    return agent, sender
