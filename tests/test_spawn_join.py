"""A worker joins its cgroup through its helper before its own program runs, and ``spawn`` does not
wait for the join (rbee/hive/processes.py). Against real processes and this machine's real cgroups
(v1 controllers and the controller-less v2 mount, each test on both).

The helper is held at a chosen point by a FIFO nobody writes to (the shell blocks opening it, in
no child process), so each stage of the join is reached for certain, never by timing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from rbee import CgroupError
from rbee.hive import processes
from rbee.hive.cgroups.base import Placement
from rbee.hive.processes import JOIN_THEN_EXEC, SHELL, ProcessMonitor, program_argv

from .conftest import sleeper
from .hivekit import wait_exited, wait_joined


def writes_marker(marker: Path) -> list[str]:
    """A worker whose program, if it ever runs, leaves ``marker`` behind."""
    return [sys.executable, "-c", f"open({str(marker)!r}, 'w'); import time; time.sleep(600)"]


def hold(monkeypatch, tmp_path: Path, where: str) -> Path:
    """Make every helper wait on a FIFO ``before`` it joins, or ``after`` it joined but before it
    execs; opening the FIFO for writing lets them go on."""
    fifo = tmp_path / f"hold-{where}"
    os.mkfifo(fifo)
    wait = f"read _ < '{fifo}'; "
    before, _, after = JOIN_THEN_EXEC.partition("shift; exec")
    script = wait + JOIN_THEN_EXEC if where == "before" else before + wait + "shift; exec" + after
    monkeypatch.setattr(processes, "JOIN_THEN_EXEC", script)
    return fifo


def release(fifo: Path) -> None:
    os.close(os.open(fifo, os.O_WRONLY))  # the helpers' open returns; their read sees EOF


def test_spawn_returns_before_the_join_and_the_worker_runs_inside_its_cgroup(
        cgroup_monitor, tmp_path, monkeypatch):
    fifo = hold(monkeypatch, tmp_path, "before")
    marker = tmp_path / "ran"
    pid = cgroup_monitor.spawn("llm", "held", writes_marker(marker))
    worker = cgroup_monitor.get("llm", "held")
    assert worker.process is not None and worker.process.poll() is None
    assert cgroup_monitor.backend.pids("llm", "held") == []  # not joined, yet spawned
    assert not marker.exists()
    release(fifo)
    assert wait_joined(cgroup_monitor, "llm", "held") == pid  # the same PID, now the worker
    for root in cgroup_monitor.backend.roots:  # in every hierarchy (v1: one per controller)
        assert pid in [int(p) for p in (root / "llm" / "held" / "cgroup.procs").read_text().split()]
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the worker's program never ran"
        time.sleep(0.01)


def test_a_worker_stopped_before_it_joined_never_runs_and_stops_at_once(
        cgroup_monitor, tmp_path, monkeypatch):
    """Its helper is not in the cgroup: the stop's SIGTERM goes to it directly instead of being
    lost, so the stop does not wait out its grace period, and the worker's program never ran."""
    hold(monkeypatch, tmp_path, "before")
    marker = tmp_path / "ran"
    pid = cgroup_monitor.spawn("llm", "early", writes_marker(marker))
    ended = []
    cgroup_monitor.subscribe(lambda event, worker: ended.append(worker.last_exit))
    started = time.monotonic()
    cgroup_monitor.stop("llm", "early", grace=30)
    assert time.monotonic() - started < 10  # far below the grace: the signal reached it
    assert not marker.exists()
    assert not Path(f"/proc/{pid}").exists() or b") Z" in Path(f"/proc/{pid}/stat").read_bytes()
    assert ended[0].signal == signal.SIGTERM.name
    assert cgroup_monitor.backend.enumerate() == []


def test_a_worker_whose_cgroup_went_before_it_joined_never_runs(
        cgroup_monitor, tmp_path, monkeypatch):
    """The join fails (its cgroup was removed meanwhile): the helper ends with 125 and the shell's
    words, and the worker's program never ran."""
    fifo = hold(monkeypatch, tmp_path, "before")
    marker = tmp_path / "ran"
    pid = cgroup_monitor.spawn("llm", "orphan", writes_marker(marker))
    worker = cgroup_monitor.get("llm", "orphan")
    cgroup_monitor.backend.remove("llm", "orphan")  # empty: rmdir succeeds
    release(fifo)
    wait_exited(pid)
    assert cgroup_monitor.reap(worker)
    assert worker.last_exit is not None and worker.last_exit.exit_code == 125
    assert "cgroup.procs" in " ".join(worker.last_exit.stderr_tail)
    assert not marker.exists()


def test_a_hive_restarted_while_a_helper_joins_adopts_the_worker_by_its_own_command(
        cgroup_monitor, tmp_path, monkeypatch):
    """A helper that joined but has not exec'd yet shows the shell in /proc: the next hive adopts
    the worker under the command the helper is about to run, and the worker runs on."""
    fifo = hold(monkeypatch, tmp_path, "after")
    argv = sleeper()
    pid = cgroup_monitor.spawn("llm", "between", argv)
    deadline = time.monotonic() + 10
    while pid not in cgroup_monitor.backend.pids("llm", "between"):
        assert time.monotonic() < deadline, "the helper never joined"
        time.sleep(0.002)
    cgroup_monitor.release()
    restarted = ProcessMonitor(cgroup_monitor.backend)
    (adopted,) = restarted.adopt_existing()
    assert adopted.pid == pid and adopted.argv == tuple(argv)
    release(fifo)
    assert wait_joined(restarted, "llm", "between") == pid
    restarted.stop_all(grace=1.0)
    assert cgroup_monitor.backend.enumerate() == []


def test_program_argv_sees_through_the_helper_only():
    helper = (SHELL, "-c", JOIN_THEN_EXEC, "rbee-join", "/cg/a/cgroup.procs", "--", "/bin/sleep",
              "600")
    assert program_argv(helper) == ("/bin/sleep", "600")
    assert program_argv(("/bin/sleep", "600")) == ("/bin/sleep", "600")
    assert program_argv((SHELL, "-c", "echo --; exec sleep 1", "x", "--", "y")) == (
        SHELL, "-c", "echo --; exec sleep 1", "x", "--", "y")  # someone else's shell
    assert program_argv(()) == ()


def test_an_unwritable_cgroup_file_is_a_clear_error_at_spawn(cgroup_monitor, monkeypatch):
    """What the parent can check, it checks before starting anything: nothing is left behind."""
    backend = cgroup_monitor.backend
    real_create = backend.create

    def create(group, instance, limits):
        placement = real_create(group, instance, limits)
        directory = str(backend.primary / group / instance)  # cannot be opened for writing
        return Placement(procs_files=(directory,), limits_applied=placement.limits_applied)

    monkeypatch.setattr(backend, "create", create)
    with pytest.raises(CgroupError, match=r"^cannot open .*/llm/bad: Is a directory"):
        cgroup_monitor.spawn("llm", "bad", sleeper())
    assert cgroup_monitor.workers() == [] and backend.enumerate() == []


async def test_the_hive_publishes_a_spawned_worker_before_it_joined_and_a_stop_is_immediate(
        tmp_path, monkeypatch):
    """The heartbeat that announces a spawn does not wait for the join: with the helper held
    before it joins, the hive's latest heartbeat already lists the worker (``starting``), and
    deleting it at once ends it without waiting out the stop grace period."""
    import trio

    from rbee.config import WorkerSpec

    from .hivekit import hive_config, start_hive

    hold(monkeypatch, tmp_path, "before")
    marker = tmp_path / "ran"
    config = hive_config("spawn-join", stop_grace_s=30)
    async with trio.open_nursery() as nursery:
        agent, _ = await start_hive(nursery, config)
        generation = agent.generation
        spec = WorkerSpec(group="llm", instance="fresh", argv=writes_marker(marker))
        pid = await agent.spawn(spec)
        with trio.fail_after(10):
            while not any(w.instance == "fresh" for w in agent.latest.workers):
                generation, _ = await agent.wait_newer(generation)
        (record,) = [w for w in agent.latest.workers if w.instance == "fresh"]
        assert record.pid == pid and record.state.value == "starting"
        assert agent.monitor.backend.pids("llm", "fresh") == []  # still held before its join
        with trio.fail_after(10):  # far below stop_grace_s: the signal reached the helper
            await agent.stop_worker("llm", "fresh")
        assert not any(w.instance == "fresh" for w in agent.monitor.workers())
        nursery.cancel_scope.cancel()
    assert not marker.exists()
