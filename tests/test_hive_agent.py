"""The trio hive agent with real workers: a complete heartbeat every interval, an immediate one
when a worker exits, and a clean stop."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime

import psutil
import pytest
import trio
from trio.testing import MockClock

from rbee import (
    CgroupError,
    Degraded,
    Healthy,
    NotFoundError,
    OperationalStatus,
    SpawnError,
    WorkerExit,
    WorkerState,
)
from rbee.config import HiveConfig, WorkerSpec, parse_config
from rbee.hive.agent import HiveAgent
from rbee.hive.supervisor import Supervisor
from rbee.plugin import hookimpl

from .builders import worker
from .conftest import IS_ROOT, RUN_ROOT, V1_MOUNTS, V2_MOUNT, sleeper
from .fakes import write_fake_nvidia_smi
from .hivekit import hive_config, sleeper_specs, wait_joined


async def test_agent_publishes_heartbeats_and_reacts_to_exit_at_once():
    # heartbeats and collections 30 s apart: a snapshot with the exit within seconds was pushed
    agent = HiveAgent(hive_config("agent", workers=sleeper_specs(2), heartbeat={"interval_s": 30},
                                  collect={"interval_s": 30}))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        heartbeat = agent.latest
        assert heartbeat.hive.operational_status == OperationalStatus.READY
        assert heartbeat.hive.health_status == Healthy()
        assert sorted(w.instance for w in heartbeat.workers) == ["w0", "w1"]
        victim = next(w.pid for w in heartbeat.workers if w.instance == "w0")
        os.kill(victim, signal.SIGKILL)
        with trio.fail_after(5):  # well inside the 30 s intervals: pushed, not polled
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
                    or phoenix.pid == pids["phoenix"] or not agent.supervisor.down(("llm", "mortal")):
                await agent.wait_changed()
        # The others' fate is decided when they end, not by waiting: "never" ended with no
        # restart scheduled, and the stopped one is no longer kept at all.
        mortal = agent.supervisor.lives[("llm", "mortal")]
        assert (mortal.state, mortal.next_attempt_at) == (WorkerState.EXITED, None)
        assert ("llm", "retired") not in agent.supervisor.lives
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
        assert wait_joined(first.monitor, "llm", "alpha") == first.monitor.get("llm", "alpha").pid
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


def test_a_record_read_before_its_process_ended_is_not_listed_as_live():
    """A tick that read a worker's process just before it ended (its exit recorded meanwhile)
    lists it as its lifecycle says: down with the ended PID, or, restarted since, starting
    with no PID; never as a live ``starting`` record of the ended process."""
    spec = WorkerSpec(group="llm", instance="w0", argv=["x"], restart="always")
    supervisor = Supervisor()
    supervisor.keep(spec)
    ending = WorkerExit(at=datetime.now(UTC), pid=4242, signal="SIGKILL")
    assert supervisor.ended(("llm", "w0"), ending, 0) is not None  # to be restarted
    read_before = worker("w0", group="llm", pid=4242, rate_window_s=0.0)
    other = worker("w1", group="llm", pid=5151, rate_window_s=1.0)
    (w0, w1) = sorted(supervisor.records([read_before, other]), key=lambda w: w.instance)
    assert (w0.state, w0.pid, w0.last_exit) == (WorkerState.BACKOFF, 4242, ending)
    assert (w1.state, w1.pid) == (WorkerState.RUNNING, 5151)

    supervisor.started(("llm", "w0"))  # restarted: its new process is not in this tick's list
    (w0,) = [w for w in supervisor.records([read_before]) if w.instance == "w0"]
    assert (w0.state, w0.pid, w0.restarts) == (WorkerState.STARTING, 0, 1)


CRASHER = ["/bin/sh", "-c", "echo to stdout; echo 'fatal: no model at /models/x' >&2; exit 3"]


@pytest.fixture
def mock_clock():
    """Jump virtual time after 20 ms of real idleness. Not 0: these hives start real processes
    in worker threads, and at 0 virtual time races through several backoffs while one starts, so
    the heartbeats could not show each state. The schedule asserted is the supervisor's own
    (``next_attempt_at`` minus the exit, in wall-clock time), which no clock jump changes."""
    return MockClock(autojump_threshold=0.02)


async def test_a_failing_worker_stays_listed_backs_off_then_crashloops_and_deletes(mock_clock):
    """Issue 22 item 4, under trio's MockClock (the backoff schedule is the point): a worker that
    exits 3 at once is listed in every heartbeat, in ``backoff`` with the next attempt 1 s then
    2 s after its exit, then from its third quick failure in ``crashloop`` at the longest backoff,
    with its restart count, exit code and last stderr line; DELETE while it waits succeeds."""
    agent = HiveAgent(hive_config("crash", workers=[
        {"group": "llm", "instance": "bad", "argv": CRASHER, "restart": "on-failure",
         "restart_backoff_s": 1.0, "restart_backoff_max_s": 8.0, "crashloop_after": 3}]))
    seen: list[tuple[WorkerState, int, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        deadline = time.monotonic() + 60  # real seconds
        while len(seen) < 5:
            assert time.monotonic() < deadline, seen
            listed = [w for w in (await agent.wait_changed()).workers if w.instance == "bad"]
            assert len(listed) == 1  # never missing, never twice
            worker = listed[0]
            if worker.state in (WorkerState.BACKOFF, WorkerState.CRASHLOOP):
                wait = (worker.next_attempt_at - worker.last_exit.at).total_seconds()
                entry = (worker.state, worker.restarts, round(wait))
                if entry not in seen:
                    seen.append(entry)
        assert seen == [(WorkerState.BACKOFF, 0, 1), (WorkerState.BACKOFF, 1, 2),
                        (WorkerState.CRASHLOOP, 2, 8), (WorkerState.CRASHLOOP, 3, 8),
                        (WorkerState.CRASHLOOP, 4, 8)]
        ending = worker.last_exit
        assert (ending.exit_code, ending.signal, ending.oom_killed) == (3, None, False)
        assert ending.stderr_tail == ["fatal: no model at /models/x"]  # stderr only, bounded
        assert agent.monitor.get_or_none("llm", "bad") is None  # waiting: no process
        await agent.stop_worker("llm", "bad")  # DELETE during the wait: a success
        while "bad" in [w.instance for w in (await agent.wait_changed()).workers]:
            assert time.monotonic() < deadline  # a snapshot begun before the DELETE may list it
        assert "bad" not in [w.instance for w in agent.latest.workers]
        with pytest.raises(NotFoundError):
            await agent.stop_worker("llm", "bad")
        nursery.cancel_scope.cancel()


OOM_HOG = [sys.executable, "-c", "x = bytearray(200 * 2**20); import time; time.sleep(60)"]


def memory_limits_enforced() -> bool:
    """Whether the auto backend here enforces memory limits: v1's memory controller (this
    machine), or a pure v2 host offering ``memory`` (a production GPU host)."""
    if not IS_ROOT:
        return False
    if V2_MOUNT is not None and str(V2_MOUNT) == "/sys/fs/cgroup":
        return "memory" in (V2_MOUNT / "cgroup.controllers").read_text().split()
    return "memory" in V1_MOUNTS


@pytest.mark.skipif(not memory_limits_enforced(),
                    reason="needs root and a memory cgroup controller (v1, or pure v2)")
async def test_oom_kills_are_counted_across_restarts_and_an_unrestarted_one_is_oom_killed():
    """Issue 22 item 5, real OOM kills under a real memory limit (v1 here: memory.oom_control;
    v2's memory.events on a pure-v2 host): each counts, summed over restarts; the exit says
    oom_killed; a worker that is not restarted is in state oom_killed."""
    agent = HiveAgent(hive_config("oom", workers=[
        {"group": "llm", "instance": "again", "argv": OOM_HOG, "memory_limit": "48M",
         "restart": "always", "restart_backoff_s": 0.1, "crashloop_after": 100},
        {"group": "llm", "instance": "once", "argv": OOM_HOG, "memory_limit": "48M",
         "restart": "never"}]))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(60):
            while True:
                workers = {w.instance: w for w in (await agent.wait_changed()).workers}
                again, once = workers["again"], workers["once"]
                if again.oom_kills >= 2 and once.state is WorkerState.OOM_KILLED:
                    break
        assert again.restarts >= 1 and again.last_exit.oom_killed
        assert again.last_exit.signal == "SIGKILL" and again.last_exit.exit_code is None
        assert (once.oom_kills, once.restarts, once.last_exit.oom_killed) == (1, 0, True)
        nursery.cancel_scope.cancel()


async def test_spawning_over_a_live_worker_changes_nothing_and_over_an_ended_one_replaces_it():
    """A spawn of a name that runs is refused and leaves it kept by its policy; a spawn of a
    name that ended (listed as exited) starts it anew, with a fresh restart count."""
    agent = HiveAgent(hive_config("respawn", workers=[
        {"group": "llm", "instance": "kept", "argv": sleeper(), "restart_backoff_s": 0.1},
        {"group": "llm", "instance": "done", "argv": ["/bin/sh", "-c", "exit 0"],
         "restart": "on-failure"}]))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        kept = agent.monitor.get("llm", "kept").pid
        with pytest.raises(SpawnError, match="already exists"):
            await agent.spawn(WorkerSpec(group="llm", instance="kept", argv=sleeper()))
        with trio.fail_after(10):
            while WorkerState.EXITED not in [w.state for w in (await agent.wait_changed()).workers
                                             if w.instance == "done"]:
                pass
        pid = await agent.spawn(WorkerSpec(group="llm", instance="done", argv=sleeper()))
        assert agent.monitor.get("llm", "done").pid == pid
        os.kill(kept, signal.SIGKILL)  # still kept by its policy: it comes back
        with trio.fail_after(10):
            while (w := agent.monitor.get_or_none("llm", "kept")) is None or w.pid == kept:
                await agent.wait_changed()
        nursery.cancel_scope.cancel()


class HeldCollection:
    """A collector plugin that, once armed, holds the next collection in its first worker until
    released: a collection under way, as one often is when an operator stops a worker."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(10)


async def test_a_stopped_worker_is_not_listed_once_the_stop_returns():
    """``stop_worker`` (the hive's ``DELETE /v1/workers/...``) returns once a snapshot collected
    after the stop is the latest: a collection that read the worker's process before it stopped
    does not list it again after the answer."""
    held = HeldCollection()
    agent = HiveAgent(hive_config("stop-listed", workers=sleeper_specs(2),
                                  heartbeat={"interval_s": 30}, collect={"interval_s": 30}),
                      extra_plugins=[held])
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        victim = next(w.pid for w in agent.latest.workers if w.instance == "w0")
        held.armed = True
        await agent.spawn(WorkerSpec(group="llm", instance="w2", argv=sleeper()))  # collects now
        assert await trio.to_thread.run_sync(held.entered.wait, 10)
        stopped = trio.Event()

        async def stop() -> None:
            await agent.stop_worker("llm", "w0")
            stopped.set()

        nursery.start_soon(stop)
        with trio.fail_after(10):
            while psutil.pid_exists(victim) and psutil.Process(victim).status() != "zombie":
                await trio.sleep(0.05)
        assert "w0" in [w.instance for w in agent.latest.workers]  # the last snapshot still
        held.release.set()  # the held collection, which read w0 alive, is published
        with trio.fail_after(10):
            await stopped.wait()
        assert "w0" not in [w.instance for w in agent.latest.workers]
        nursery.cancel_scope.cancel()
