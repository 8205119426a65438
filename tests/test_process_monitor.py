"""The seed's ProcessMonitor tests, against real processes and the real cgroups of this machine.

``monitor`` runs each test on every backend the kernel offers here: v1 controllers, the
controller-less v2 mount (real cgroups, limits not enforceable) and none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbee import LimitError, NotFoundError, SpawnError
from rbee.contract import on_gpu
from rbee.hive.cgroups import CgroupV2
from rbee.hive.collection import TelemetryCollector
from rbee.hive.processes import WorkerEvent
from rbee.plugin.manager import build_plugin_manager

from .conftest import busy_worker, needs_v1, needs_v2, sleeper
from .fakes import StubNvml, write_fake_nvidia_smi
from .hivekit import wait_exited, wait_for_text, wait_joined


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def collector_for(monitor, **settings) -> TelemetryCollector:
    from rbee.config import CollectorSettings

    return TelemetryCollector(monitor, build_plugin_manager(), CollectorSettings(**settings))


def test_spawn_creates_cgroup(monitor):
    pid = monitor.spawn("llm", "w1", sleeper())
    assert wait_joined(monitor, "llm", "w1") == pid
    backend = monitor.backend
    if backend.name == "none":
        assert backend.pids("llm", "w1") == [pid]
        return
    for root in backend.roots:
        assert (root / "llm" / "w1").is_dir()
    assert pid in backend.pids("llm", "w1")
    relative = "/" + str((backend.primary / "llm" / "w1").relative_to(backend.primary.parents[1]))
    assert relative in cgroup_of(pid)


@needs_v1
def test_spawn_applies_cpu_limit(v1_monitor):
    v1_monitor.spawn("llm", "cpu", sleeper(), cpu_limit="150%")
    cpu_dir = v1_monitor.backend.dirs["cpu"] / "llm" / "cpu"
    assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "150000"
    assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert v1_monitor.get("llm", "cpu").limits.cpu_pct == 150.0


@needs_v1
def test_spawn_applies_memory_limit(v1_monitor):
    v1_monitor.spawn("llm", "mem", sleeper(), memory_limit="64M")
    memory_dir = v1_monitor.backend.dirs["memory"] / "llm" / "mem"
    assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 64 * 2**20


@needs_v1
def test_spawn_memory_limit_is_enforced(v1_monitor):
    """A worker allocating past its memory limit is killed by the kernel, not the host."""
    hog = [sys.executable, "-c", "x = bytearray(200 * 2**20); import time; time.sleep(60)"]
    v1_monitor.spawn("llm", "hog", hog, memory_limit="64M")
    process = v1_monitor.get("llm", "hog").process
    assert process.wait(timeout=20) == -signal.SIGKILL


def test_spawn_returns_valid_pid(monitor):
    pid = monitor.spawn("llm", "pid", sleeper())
    assert pid > 1 and wait_joined(monitor, "llm", "pid") == pid
    os.kill(pid, 0)  # exists
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sleep")
    assert monitor.get("llm", "pid").pid == pid


def test_collect_reads_cgroup_stats(monitor):
    """CPU % from usage deltas and I/O rates from io counter deltas are real, not 0 (defects 2, 3)."""
    monitor.spawn("llm", "busy", busy_worker())
    collector = collector_for(monitor, gpu="none")
    first = collector.collect_instance("llm", "busy")
    assert first.rate_window_s == 0.0 and first.cpu_pct == 0.0
    time.sleep(1.1)  # rates are measured over at least collect.rate_window_s (1 s)
    second = collector.collect_instance("llm", "busy")
    assert second.rate_window_s > 1.0
    assert 5.0 < second.cpu_pct < 150.0
    assert second.rss_mb > 1.0
    # all the cgroup charges is at least the RSS (memory_mb is to the hundredth, rss_mb whole)
    assert (second.memory_mb >= second.rss_bytes / 2**20 - 0.01
            or monitor.backend.name == "none")
    if monitor.backend.name in ("v1", "none"):
        assert second.io_w_mb_s > 0.0  # /proc/<pid>/io counts the fsync'ed writes


CPU_BURNER = [sys.executable, "-c", "import os\nos.fork()\nwhile True: pass"]
"""Two processes spinning: 200 % of CPU wanted, so only the quota holds them back."""


@needs_v1
def test_cpu_pct_never_above_the_limit_however_often_collected_and_across_restarts(v1_monitor):
    """Issue 22 item 6: the hive collects at once on every spawn and exit, so a worker's rate
    window could be a few milliseconds, over which a CFS quota (enforced per 100 ms period) and
    per-tick CPU charging read 2-8x the limit (233 % under 25 % in the demo's history). Collected
    at gaps from 0 to 300 ms, through a restart, a 50 % worker never reads above its limit by more
    than one CFS period's quota over the 1 s floor (10 %) plus a point of clock noise."""
    collector = collector_for(v1_monitor, gpu="none")
    gaps = (0.0, 0.002, 0.01, 0.05, 0.3)
    readings: list[tuple[float, float]] = []
    for _incarnation in range(2):
        v1_monitor.spawn("llm", "burn", CPU_BURNER, cpu_limit="50%")
        for tick in range(40):
            record = collector.collect_instance("llm", "burn")
            if record.rate_window_s > 0:
                readings.append((record.cpu_pct, record.rate_window_s))
            time.sleep(gaps[tick % len(gaps)])
        v1_monitor.stop("llm", "burn", grace=1.0)
    assert len(readings) > 10
    assert all(window >= 1.0 for _, window in readings)
    assert max(pct for pct, _ in readings) <= 50 * 1.1 + 1, readings
    assert max(pct for pct, _ in readings) > 20, readings  # it really burned (even under load)


def test_collect_queries_nvidia_smi(monitor, tmp_path, monkeypatch):
    """A fake nvidia-smi on PATH (no GPU here) reporting the worker's PID: VRAM and totals come
    from what the tool printed, never from a constant (defect 5)."""
    pid = monitor.spawn("llm", "gpu", sleeper())
    write_fake_nvidia_smi(tmp_path, apps=[(pid, 1, 4000)])
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    collector = collector_for(monitor, gpu="nvidia-smi")
    devices = collector.refresh_devices()
    assert [d.vram_total_mb for d in devices] == [81559.0, 97871.0]
    record = collector.collect_instance("llm", "gpu")
    assert record.gpu_indices == [1]
    assert record.vram_mb == 4000.0
    assert record.total_vram_mb == 97871.0
    assert record.gpu_util_pct == 37.0  # the device's, nvidia-smi has no per-process figure
    collector.close()


def test_collect_parses_cmdline(monitor):
    monitor.spawn("llm", "a", [*sleeper(), "--model", "ignored-by-sleep"][:2])
    monitor.spawn("llm", "b", busy_worker("llama-3-8b"))
    collector = collector_for(monitor, gpu="none")
    models = {r.instance: r.model for r in collector.collect_all()}
    assert models == {"a": None, "b": "llama-3-8b"}


def test_collect_calculates_uptime(monitor):
    monitor.spawn("llm", "up", sleeper())
    collector = collector_for(monitor, gpu="none")
    time.sleep(1.2)
    record = collector.collect_instance("llm", "up")
    assert 1 <= record.uptime_s <= 3


def test_collect_handles_missing_gpu(monitor, monkeypatch):
    """"No GPU" injected, so this holds on a GPU host too: an NVML whose library is missing and
    no nvidia-smi on PATH, with the default ``gpu: auto``."""
    from rbee.collectors.gpu import GpuPlugin

    from rbee.config import CollectorSettings

    monkeypatch.setenv("PATH", "/nonexistent")
    monitor.spawn("llm", "nogpu", sleeper())
    manager = build_plugin_manager(disabled=["gpu"], extra_plugins=[GpuPlugin(StubNvml(driver=False))])
    collector = TelemetryCollector(monitor, manager, CollectorSettings())
    assert collector.refresh_devices() == []
    assert collector.refresh_errors == []
    record = collector.collect_instance("llm", "nogpu")
    # no GPU: no GPU figures (gpu_util_pct null; the original record's whole-MiB VRAM fields
    # stay 0 on the wire, and every reader shows them absent: on_gpu is False)
    assert (record.gpu_util_pct, record.vram_mb, record.total_vram_mb) == (None, 0, 0)
    assert not on_gpu(record)
    assert record.errors == []


def test_collect_handles_dead_process(monitor):
    pid = monitor.spawn("llm", "dies", sleeper())
    monitor.spawn("llm", "lives", sleeper())
    events = []
    monitor.subscribe(lambda event, worker: events.append((event, worker.instance)))
    collector = collector_for(monitor, gpu="none")
    os.kill(pid, signal.SIGKILL)
    wait_exited(pid)
    records = collector.collect_all()
    assert [r.instance for r in records] == ["lives"]
    assert (WorkerEvent.EXITED, "dies") in events
    assert not Path(f"/proc/{pid}").exists()  # reaped, no zombie
    assert ("llm", "dies") not in monitor.backend.enumerate()


def test_the_tick_hands_an_exited_worker_on_instead_of_reaping_it(monitor):
    """The hive's collector reaps nothing itself: an exited worker is left out of the tick and
    handed to ``on_gone`` (the hive reaps it in a thread of its own, so killing what it left
    behind never holds a tick); the reap then announces it once."""
    pid = monitor.spawn("llm", "gone", sleeper())
    monitor.spawn("llm", "stays", sleeper())
    gone: list = []
    events: list = []
    monitor.subscribe(lambda event, worker: events.append((event, worker.instance)))
    collector = collector_for(monitor, gpu="none")
    collector.on_gone = gone.append
    os.kill(pid, signal.SIGKILL)
    wait_exited(pid)
    assert [r.instance for r in collector.collect_all()] == ["stays"]
    assert [w.instance for w in gone] == ["gone"] and events == []
    assert monitor.get_or_none("llm", "gone") is gone[0]  # not reaped by the tick
    assert monitor.reap(gone[0]) is True and monitor.reap(gone[0]) is False
    assert events == [(WorkerEvent.EXITED, "gone")]
    assert gone[0].last_exit.signal == "SIGKILL"
    assert not Path(f"/proc/{pid}").exists()


def test_enumerate_walks_cgroup_tree(cgroup_monitor):
    monitor = cgroup_monitor
    first = monitor.spawn("llm", "a", sleeper())
    second = monitor.spawn("embed", "b", sleeper())
    wait_joined(monitor, "llm", "a"), wait_joined(monitor, "embed", "b")
    assert sorted(monitor.enumerate()) == [("embed", "b", second), ("llm", "a", first)]
    # A restarted hive finds the same workers in the tree and adopts them.
    from rbee.hive.processes import ProcessMonitor

    monitor.release()
    restarted = ProcessMonitor(monitor.backend)
    adopted = restarted.adopt_existing()
    assert sorted((w.group, w.instance, w.pid) for w in adopted) == [
        ("embed", "b", second), ("llm", "a", first)]
    assert restarted.get("llm", "a").argv == tuple(sleeper())
    restarted.stop_all(grace=0.5)
    assert monitor.backend.enumerate() == []
    for pid in (first, second):
        assert not Path(f"/proc/{pid}").exists() or b") Z" in Path(f"/proc/{pid}/stat").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/worker-binary"], "not found"),
    (["no-such-worker-binary-rbee"], "not found on PATH"),
    (["{plain_file}"], "not executable"),
    (["/tmp"], "not executable"),
])
def test_spawn_invalid_binary(monitor, tmp_path, argv, message):
    plain_file = tmp_path / "model.bin"
    plain_file.write_text("not a program")
    argv = [arg.format(plain_file=plain_file) for arg in argv]
    with pytest.raises(SpawnError, match=message):
        monitor.spawn("llm", "bad", argv)
    assert monitor.workers() == []
    assert ("llm", "bad") not in monitor.backend.enumerate()


@pytest.mark.parametrize("cpu, memory, message", [
    ("abc", None, "invalid CPU limit 'abc'"),
    ("0%", None, "greater than 0"),
    ("-5%", None, "greater than 0"),
    (None, "12Q", "invalid memory limit '12Q'"),
    (None, "0", "greater than 0"),
])
def test_spawn_invalid_cpu_limit(monitor, cpu, memory, message):
    with pytest.raises(LimitError, match=message):
        monitor.spawn("llm", "limits", sleeper(), cpu_limit=cpu, memory_limit=memory)
    assert monitor.workers() == []
    assert monitor.backend.enumerate() == []


def test_spawn_duplicate_and_bad_names(monitor):
    monitor.spawn("llm", "dup", sleeper())
    with pytest.raises(SpawnError, match="already exists"):
        monitor.spawn("llm", "dup", sleeper())
    with pytest.raises(SpawnError, match="invalid group name"):
        monitor.spawn("../etc", "x", sleeper())
    assert [w.instance for w in monitor.workers()] == ["dup"]


def test_stop_escalates_to_sigkill_and_removes_cgroup(monitor, tmp_path):
    stubborn = [sys.executable, "-c",
                "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)"]
    log = str(tmp_path / "stubborn.log")
    pid = monitor.spawn("llm", "stubborn", stubborn, log_path=log)
    wait_for_text(log, "ready")  # its SIGTERM handler is installed
    started = time.monotonic()
    monitor.stop("llm", "stubborn", grace=0.3)
    assert time.monotonic() - started < 3
    assert monitor.get_or_none("llm", "stubborn") is None
    assert not Path(f"/proc/{pid}").exists()
    assert monitor.backend.enumerate() == []
    with pytest.raises(NotFoundError):
        monitor.stop("llm", "stubborn")


def test_spawn_fallback_on_non_linux_explicit_none(none_monitor):
    """Variant 1: the none backend (no cgroups): plain process, limits reported as not applied."""
    pid = none_monitor.spawn("llm", "plain", busy_worker(), cpu_limit="50%")
    worker = none_monitor.get("llm", "plain")
    assert worker.limits_applied is False
    collector = collector_for(none_monitor, gpu="none", rate_window_s=0.5)
    collector.collect_all()
    time.sleep(0.5)
    record = collector.collect_instance("llm", "plain")
    assert record.pid == pid and record.limits_applied is False
    assert record.cpu_pct > 5.0 and record.rss_mb > 1.0


UNPRIVILEGED = """
import os, sys
from rbee.hive.cgroups import select_backend
from rbee.hive.processes import ProcessMonitor
os.setgid(65534); os.setuid(65534)  # after the imports: nobody cannot read root's Python install
backend = select_backend("auto", sys.argv[1])
monitor = ProcessMonitor(backend)
pid = monitor.spawn("llm", "u", ["sleep", "30"], cpu_limit="50%")
print(backend.name, monitor.get("llm", "u").limits_applied)
monitor.stop_all(grace=0.5)
try:
    select_backend("v1", sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@needs_v1
def test_spawn_fallback_on_non_linux_unprivileged(tmp_path):
    """Variant 2: an unprivileged hive (user nobody) cannot create cgroups: "auto" falls back to
    the none backend with a warning, and an explicit v1 request fails naming the path."""
    from .conftest import RUN_ROOT

    result = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED, f"{RUN_ROOT}/unprivileged"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "none False"
    assert lines[1].startswith("CgroupError permission denied creating cgroup /sys/fs/cgroup/")
    assert "unprivileged" in lines[1]


@needs_v2
def test_v2_worker_on_real_unified_mount():
    """The real v2 mount here has no controllers: cpu.stat still counts, limits cannot apply."""
    from rbee.hive.cgroups import select_backend
    from rbee.hive.processes import ProcessMonitor

    from .conftest import RUN_ROOT

    backend = select_backend("v2", f"{RUN_ROOT}/v2real")
    assert isinstance(backend, CgroupV2)
    monitor = ProcessMonitor(backend)
    try:
        pid = monitor.spawn("llm", "v2", busy_worker(), cpu_limit="50%")
        wait_joined(monitor, "llm", "v2")
        assert f"0::/{RUN_ROOT}/v2real/llm/v2" in cgroup_of(pid)
        collector = collector_for(monitor, gpu="none", rate_window_s=0.5)
        collector.collect_all()
        time.sleep(0.5)
        record = collector.collect_instance("llm", "v2")
        assert record.cpu_pct > 5.0
        assert record.limits_applied is ("cpu" in backend.enabled)
    finally:
        monitor.stop_all(grace=0.5)
        backend.remove_root()


V2_MEMORY_EVENTS = b"low 0\nhigh 0\nmax 41\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_OOM_CONTROL = b"oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"


def test_oom_kill_counters_of_both_cgroup_versions(tmp_path):
    """Issue 22 item 5: the OOM-kill count is the ``oom_kill`` line of v2's memory.events and of
    v1's memory.oom_control (not ``oom_kill_disable`` nor ``oom_group_kill``); the counter keeps
    its highest reading, re-read in place. (This host's v2 mount has no memory controller: v2's
    file is exercised in its kernel format here, and for real on a pure-v2 host.)"""
    from rbee.hive.oom import OomCounter, parse_oom_kills

    assert parse_oom_kills(V2_MEMORY_EVENTS) == 2
    assert parse_oom_kills(V1_OOM_CONTROL) == 7
    assert parse_oom_kills(b"oom_kill_disable 1\nunder_oom 0\n") == -1
    events = tmp_path / "memory.events"
    events.write_bytes(V2_MEMORY_EVENTS)
    counter = OomCounter(str(events))
    assert counter.read() == 2
    events.write_bytes(V2_MEMORY_EVENTS.replace(b"oom_kill 2", b"oom_kill 5"))
    assert counter.read() == 5 and counter.last == 5
    counter.close()
    assert counter.read() == 5  # closed (its cgroup gone): the last count stands
    assert OomCounter(None).read() == 0 and OomCounter(str(tmp_path / "absent")).read() == 0


@needs_v1
def test_an_oom_killed_worker_ends_oom_killed_with_its_signal(v1_monitor):
    """A real OOM kill under a v1 memory limit: SIGKILL, and memory.oom_control counted it."""
    hog = [sys.executable, "-c", "x = bytearray(200 * 2**20); import time; time.sleep(60)"]
    v1_monitor.spawn("llm", "hog", hog, memory_limit="48M")
    worker = v1_monitor.get("llm", "hog")
    worker.process.wait(timeout=20)
    v1_monitor.reap(worker)
    ending = worker.last_exit
    assert (ending.signal, ending.exit_code, ending.oom_killed) == ("SIGKILL", None, True)
    assert worker.oom.last == 1


def test_stderr_tail_is_the_last_lines_bounded_in_lines_and_characters(monitor):
    """Issue 22 item 4: a worker's stderr (not its stdout) is kept where the hive reads its last
    lines when it ends: at most 8 lines, each cut to 160 characters, 640 bytes in all."""
    from rbee.contract import MAX_TAIL_LINES, TAIL_BYTES, TAIL_LINE_CHARS

    script = ("import sys\nprint('out')\nfor i in range(50): print(f'line {i}', file=sys.stderr)\n"
              "print('x' * 500, file=sys.stderr)\nsys.exit(2)")
    monitor.spawn("llm", "loud", [sys.executable, "-c", script])
    worker = monitor.get("llm", "loud")
    worker.process.wait(timeout=20)
    monitor.reap(worker)
    tail = worker.last_exit.stderr_tail
    assert worker.last_exit.exit_code == 2 and not worker.last_exit.oom_killed
    assert tail[-1] == "x" * (TAIL_LINE_CHARS - 1) + "\u2026"
    assert tail[:-1] == [f"line {i}" for i in range(50 - len(tail) + 1, 50)]
    assert len(tail) <= MAX_TAIL_LINES and sum(len(line.encode()) for line in tail) <= TAIL_BYTES
    assert "out" not in tail


def test_stderr_goes_to_the_log_file_with_log_dir(monitor, tmp_path):
    """With a log file, the worker's output is logged there as before, and the tail read from it."""
    log = tmp_path / "w.log"
    monitor.spawn("llm", "logged", ["/bin/sh", "-c", "echo out; echo err >&2; exit 1"],
                  log_path=str(log))
    worker = monitor.get("llm", "logged")
    worker.process.wait(timeout=20)
    monitor.reap(worker)
    assert log.read_text() == "out\nerr\n"
    assert worker.last_exit.stderr_tail == ["out", "err"]


def test_a_re_adopted_workers_stderr_is_found_again_and_trimmed(cgroup_monitor, monkeypatch):
    """After a hive restart the next hive reads (and keeps bounded) the unnamed stderr file the
    earlier hive gave the worker, through /proc/<pid>/fd/2."""
    from rbee.hive import stderr_tail

    script = "import sys, time\nprint('ready', file=sys.stderr, flush=True)\ntime.sleep(600)"
    pid = cgroup_monitor.spawn("llm", "kept", [sys.executable, "-c", script])
    wait_joined(cgroup_monitor, "llm", "kept")
    cgroup_monitor.release()  # the hive stops, leaving the worker running
    (worker,) = cgroup_monitor.adopt_existing()
    assert worker.pid == pid and worker.output is not None and worker.output.owned
    deadline = time.monotonic() + 10
    while worker.output.lines() != ["ready"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.output.lines() == ["ready"]
    monkeypatch.setattr(stderr_tail, "MAX_BYTES", 2)
    worker.output.trim()
    assert worker.output.lines() == []
