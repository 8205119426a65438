"""The trio hive agent with real workers: a complete heartbeat every interval, an immediate one
when a worker exits, and a clean stop."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from rbee import CgroupError, Degraded, Healthy, OperationalStatus, WorkerState
from rbee.config import HiveConfig, WorkerSpec, parse_config
from rbee.hive.agent import HiveAgent

from .conftest import IS_ROOT, RUN_ROOT, sleeper
from .fakes import write_fake_nvidia_smi
from .hivekit import hive_config, sleeper_specs


async def test_agent_publishes_heartbeats_and_reacts_to_exit_at_once():
    agent = HiveAgent(hive_config("agent", workers=sleeper_specs(2)))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        heartbeat = agent.latest
        assert heartbeat.hive.operational_status == OperationalStatus.READY
        assert heartbeat.hive.health_status == Healthy()
        assert sorted(w.instance for w in heartbeat.workers) == ["w0", "w1"]
        victim = next(w.pid for w in heartbeat.workers if w.instance == "w0")
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(0.5):  # well inside the 1 s interval: pushed, not polled
            while not any(w.last_exit for w in (await agent.wait_changed()).workers):
                pass
        w0, w1 = sorted(agent.latest.workers, key=lambda w: w.instance)
        assert (w0.state, w0.pid, w0.last_exit.signal) == (WorkerState.BACKOFF, victim, "SIGKILL")
        assert w1.state in (WorkerState.STARTING, WorkerState.RUNNING) and w1.last_exit is None
        nursery.cancel_scope.cancel()
    assert agent.status == OperationalStatus.STOPPED
    assert agent.monitor.workers() == []
    assert agent.monitor.backend.enumerate() == []


async def test_hanging_gpu_refresh_marks_hive_degraded_but_heartbeats_go_on(tmp_path, monkeypatch):
    """nvidia-smi that hangs (a fake on PATH: no GPU here) delays no heartbeat."""
    write_fake_nvidia_smi(tmp_path, hang_s=30)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    agent = HiveAgent(hive_config("hang", workers=sleeper_specs(2), collect={
        "gpu": "nvidia-smi", "nvidia_smi_timeout_s": 5.0, "refresh_timeout_s": 0.2,
        "interval_s": 0.2}, heartbeat={"interval_s": 0.2}))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(3):
            while not isinstance((await agent.wait_changed()).hive.health_status, Degraded):
                pass
            seen = [len((await agent.wait_changed()).workers) for _ in range(3)]
        assert seen == [2, 2, 2]
        assert "longer than 0.2s" in agent.latest.hive.health_status.reason
        nursery.cancel_scope.cancel()


async def test_restart_policy_restarts_failed_workers_with_backoff():
    """on-failure: a worker killed from outside comes back (a new PID) after its backoff; never:
    it stays gone; a worker stopped on purpose is not restarted."""
    agent = HiveAgent(hive_config("restart", workers=[
        {"group": "llm", "instance": "phoenix", "argv": sleeper(), "restart": "on-failure",
         "restart_backoff_s": 0.1},
        {"group": "llm", "instance": "mortal", "argv": sleeper(), "restart": "never"},
        {"group": "llm", "instance": "retired", "argv": sleeper(), "restart": "always",
         "restart_backoff_s": 0.1}]))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        pids = {w.instance: w.pid for w in agent.monitor.workers()}
        os.kill(pids["phoenix"], signal.SIGKILL)
        os.kill(pids["mortal"], signal.SIGKILL)
        await agent.stop_worker("llm", "retired")
        with trio.fail_after(5):
            while (phoenix := agent.monitor.get_or_none("llm", "phoenix")) is None \
                    or phoenix.pid == pids["phoenix"]:
                await agent.wait_changed()
        await trio.sleep(0.5)  # well past the backoff of the others
        assert sorted(w.instance for w in agent.monitor.workers()) == ["phoenix"]
        nursery.cancel_scope.cancel()


def default_root_hive(hive_id: str, instance: str) -> HiveConfig:
    """A hive on the default cgroup root (``rbee.slice/<id>``), with one worker."""
    return parse_config({"id": hive_id, "stop_workers_on_exit": True, "collect": {"gpu": "none"},
                         "workers": [{"group": "llm", "instance": instance, "argv": sleeper()}]},
                        HiveConfig, "<test>")


@pytest.mark.skipif(not IS_ROOT, reason="needs root to create cgroups under rbee.slice")
async def test_two_hives_on_one_host_keep_their_own_workers_and_a_held_root_refuses_a_third():
    """Issue 22 item 3: each hive's default root is its own (``rbee.slice/<id>``), so a second
    hive on the host adopts none of the first's workers; a hive whose root another live hive
    holds (here: the same id) refuses to start, naming the root, the holder and the keys."""
    first = HiveAgent(default_root_hive(f"{RUN_ROOT}-a", "alpha"))
    second = HiveAgent(default_root_hive(f"{RUN_ROOT}-b", "beta"))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        assert [w.instance for w in first.latest.workers] == ["alpha"]
        assert [w.instance for w in second.latest.workers] == ["beta"]
        root = first.monitor.backend.primary
        assert root.parent.name == "rbee.slice" and root.name == f"{RUN_ROOT}-a"
        twin = HiveAgent(default_root_hive(f"{RUN_ROOT}-a", "gamma"))
        with pytest.raises(CgroupError) as refused:
            await nursery.start(twin.run)
        message = str(refused.value)
        assert f"cgroup root {root} is held by another live hive (pid {os.getpid()}:" in message
        assert "`id`" in message and "`cgroup.root`" in message
        assert twin.monitor.workers() == []
        assert [w.instance for w in first.latest.workers] == ["alpha"]  # untouched
        assert first.monitor.get("llm", "alpha").pid in first.monitor.backend.pids("llm", "alpha")
        nursery.cancel_scope.cancel()
    assert not root.exists() and not second.monitor.backend.primary.exists()


def test_restart_wanted_by_policy_and_exit_code():
    from rbee.hive.agent import restart_wanted

    spec = {"group": "g", "instance": "i", "argv": ["x"]}
    assert restart_wanted(WorkerSpec(**spec, restart="always"), 0) is True
    assert restart_wanted(WorkerSpec(**spec, restart="on-failure"), 0) is False
    assert restart_wanted(WorkerSpec(**spec, restart="on-failure"), 3) is True
    assert restart_wanted(WorkerSpec(**spec, restart="on-failure"), None) is True  # re-adopted
    assert restart_wanted(WorkerSpec(**spec, restart="never"), 3) is False
