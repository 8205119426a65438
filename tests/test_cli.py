"""The ``rbee`` command line: ``up`` (the README's main command) as a real process, ``top`` and
``workers`` against a real queen, and the fleet view they render from stream events."""

from __future__ import annotations

import glob
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta

import httpx
import msgspec
import pytest
import trio

from rbee.contract import (
    Degraded,
    EngineState,
    GpuUtilSource,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    Unhealthy,
    WorkerExit,
    WorkerState,
    utc_now,
)
from rbee.fleetview import FleetView

from .builders import gpu, heartbeat, worker
from .daemons import BIN
from .queenkit import post_heartbeat, start_queen, url_of

OUR_DEMO_WORKERS = f"^{sys.executable} -m rbee.demo.worker"
"""This checkout's demo workers only: the machine may run other installations' at the same time."""


@contextmanager
def hold_port(port: int):
    """Keep ``port`` on 127.0.0.1 busy (listening) meanwhile; if something else holds it
    already, it is busy all the same."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            pass
        yield


def test_rbee_up_on_a_busy_port_names_both_ports():
    """The hive cannot listen: a clear error, and nothing left (no worker, no cgroup root)."""
    roots = demo_roots()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        result = rbee("up", "--port", "0", "--hive-port", str(busy), "--rounds", "1")
    assert result.returncode == 1
    assert f"rbee: cannot listen on 127.0.0.1:{busy}: Address already in use" in result.stderr
    assert "`rbee up --port 0` picks free ones for both" in result.stderr
    assert subprocess.run(["pgrep", "-f", OUR_DEMO_WORKERS]).returncode == 1  # none left
    assert demo_roots() == roots


def rbee(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rbee"), *args], capture_output=True, text=True,
                          timeout=timeout)


def demo_roots() -> set[str]:
    """The demo hives' cgroup roots (``rbee.slice/demo-hive-<pid>``) on this host, any version."""
    return set(glob.glob("/sys/fs/cgroup/*/rbee.slice/demo-hive-*")
               + glob.glob("/sys/fs/cgroup/rbee.slice/demo-hive-*"))


def test_rbee_up_runs_queen_hive_and_demo_workers_and_leaves_nothing():
    """The demo end to end: the table comes from the queen's stream, so the whole pipeline ran;
    afterwards no demo worker and no cgroup of the demo is left."""
    roots = demo_roots()
    with hold_port(7835):  # the demo hive's default port, busy: --port 0 moves the hive too
        result = rbee("up", "--port", "0", "--rounds", "10")
    assert result.returncode == 0, result.stderr
    hive_api = result.stdout.split("(API ", 1)[1].split(",", 1)[0]
    assert hive_api.startswith("http://127.0.0.1:") and not hive_api.endswith(":7835")
    assert "rbee up: queen http://127.0.0.1:" in result.stdout
    queen_url = result.stdout.split("rbee up: queen ", 1)[1].split(",", 1)[0]
    assert f"\ndashboard: {queen_url}/\n" in result.stdout
    tables = result.stdout.split("rbee: queen")[1:]
    header = next(line for line in tables[-1].splitlines() if line.startswith("HIVE"))
    engine_cells = slice(header.index("RUN"), header.index("IDLE"))
    for instance, model in (("llm/llama-0", "llama-3-8b"), ("llm/llama-1", "llama-3-8b"),
                            ("embed/bge-0", "bge-small")):
        shown = [line for table in tables for line in table.splitlines() if instance in line]
        assert shown and all(line.startswith("demo-hive") and model in line for line in shown)
        cells = [tuple(line[engine_cells].split()) for line in shown]
        if instance.startswith("llm/"):  # their simulated vLLM engines, read by the hive once
            # each has started serving (a second or two after spawn on a busy machine)
            assert any(all(cell.isdigit() for cell in row) for row in cells), shown
        else:
            assert set(cells) == {("-", "-", "-")}, shown
    leftover = subprocess.run(["pgrep", "-f", OUR_DEMO_WORKERS], capture_output=True)
    assert leftover.stdout == b""
    assert demo_roots() == roots


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_rbee_up_stops_cleanly_on_a_signal(stop):
    """Ctrl-C (SIGINT) or a plain kill (SIGTERM): workers stopped, cgroups removed, exit 0."""
    process = subprocess.Popen([str(BIN / "rbee"), "up", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(30):
            while "demo-hive" not in (line := await trio.to_thread.run_sync(
                    process.stdout.readline)):
                assert line, process.stderr.read()
        process.send_signal(stop)
        _, stderr = await trio.to_thread.run_sync(lambda: process.communicate(timeout=30))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    leftover = subprocess.run(["pgrep", "-f", OUR_DEMO_WORKERS], capture_output=True)
    assert leftover.stdout == b""


async def test_rbee_top_shows_the_fleet(nursery):
    queen = await start_queen(nursery)
    async with httpx.AsyncClient() as client:
        await post_heartbeat(client, queen, heartbeat("gpu-07", [worker("a", model="qwen-7b")]))
    result = await trio.to_thread.run_sync(lambda: rbee("top", "--queen", url_of(queen),
                                                        "--rounds", "1", timeout=20))
    assert result.returncode == 0, result.stderr
    assert "1 hive (0 stale), 1 worker\n" in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("gpu-07")]
    assert "llm/a" in line and "qwen-7b" in line


async def test_rbee_workers_engine_filters_and_top_engine_columns(nursery):
    queen = await start_queen(nursery)
    async with httpx.AsyncClient() as client:
        await post_heartbeat(client, queen, heartbeat("gpu-07", [
            worker("full", engine=EngineState(engine="vllm", requests_running=8,
                                              requests_waiting=5, kv_cache_pct=93.6)),
            worker("free", engine=EngineState(engine="vllm", requests_running=1,
                                              requests_waiting=0, kv_cache_pct=12.0)),
            worker("plain"),
            worker("drained", gpu_util_pct=None, engine=EngineState(
                engine="vllm", requests_running=0, requests_waiting=0))]))
    result = await trio.to_thread.run_sync(lambda: rbee("workers", "--queen", url_of(queen),
                                                        timeout=20))
    header = next(line for line in result.stdout.splitlines() if line.startswith("HIVE"))
    idle_of = {line.split()[1]: line[header.index("IDLE"):header.index("UPTIME")].strip()
               for line in result.stdout.splitlines() if line.startswith("gpu-07")}
    # the queen's judgement: the engine decides when known, else the GPU figure
    assert idle_of == {"llm/drained": "yes", "llm/free": "no", "llm/full": "no", "llm/plain": "yes"}
    result = await trio.to_thread.run_sync(lambda: rbee(
        "workers", "--queen", url_of(queen), "--max-waiting", "0", "--max-kv-cache-pct", "80",
        timeout=20))
    assert result.returncode == 0, result.stderr
    assert "llm/free" in result.stdout and "llm/full" not in result.stdout
    assert result.stdout.rstrip().endswith("\n1 worker")
    result = await trio.to_thread.run_sync(lambda: rbee("top", "--queen", url_of(queen),
                                                        "--rounds", "1", timeout=20))
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("HIVE"))
    columns = {name: header.index(name) for name in ("RUN", "QUEUE", "KV%", "IDLE", "UPTIME")}
    full = next(line for line in lines if "llm/full" in line)
    plain = next(line for line in lines if "llm/plain" in line)
    assert full[columns["RUN"]:columns["QUEUE"]].split() == ["8"]
    assert full[columns["QUEUE"]:columns["KV%"]].split() == ["5"]
    assert full[columns["KV%"]:columns["IDLE"]].split() == ["94"]
    assert plain[columns["RUN"]:columns["IDLE"]].split() == ["-", "-", "-"]
    assert [line[columns["IDLE"]:columns["UPTIME"]].strip() for line in (full, plain)] == ["no", "yes"]


async def test_rbee_workers_shows_states_restarts_and_how_a_worker_last_ended(nursery):
    """Issue 22 item 4: a worker that is not running is listed with its state, restarts, OOM
    kills, last exit and last stderr line; only running workers pass a scheduling filter."""
    queen = await start_queen(nursery)
    crashed = WorkerExit(at=utc_now(), pid=4242, exit_code=3, ran_s=0.2,
                         stderr_tail=["loading", "fatal: no model at /models/x"])
    oomed = WorkerExit(at=utc_now(), pid=4343, signal="SIGKILL", oom_killed=True, ran_s=95)
    async with httpx.AsyncClient() as client:
        await post_heartbeat(client, queen, heartbeat("gpu-07", [
            worker("up", model="m"),
            worker("loop", model="m", pid=4242, state=WorkerState.CRASHLOOP, restarts=4,
                   last_exit=crashed, next_attempt_at=utc_now() + timedelta(seconds=30)),
            worker("oom", model="m", pid=4343, state=WorkerState.OOM_KILLED, oom_kills=2,
                   last_exit=oomed)]))
    result = await trio.to_thread.run_sync(lambda: rbee("workers", "--queen", url_of(queen),
                                                        timeout=20))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    state_at, model_at = header.index("STATE"), header.index("MODEL")
    states = {line.split()[1]: line[state_at:model_at].strip() for line in lines[1:4]}
    assert states == {"llm/up": "running", "llm/loop": "crashloop", "llm/oom": "oom_killed"}
    loop = next(line for line in lines if "llm/loop" in line)
    assert "4 restarts" in loop and "last exit: status 3 after 0s" in loop
    assert "stderr: fatal: no model at /models/x" in loop
    assert "next start in 29s" in loop or "next start in 30s" in loop
    oom = next(line for line in lines if "llm/oom" in line)
    assert "2 OOM kills" in oom and "last exit: OOM-killed after 95s" in oom
    result = await trio.to_thread.run_sync(lambda: rbee("workers", "--queen", url_of(queen),
                                                        "--model", "m", timeout=20))
    assert "llm/up" in result.stdout and "llm/loop" not in result.stdout
    assert "llm/oom" not in result.stdout


def test_rbee_workers_without_a_queen_is_a_clear_error():
    result = rbee("workers", "--queen", "http://127.0.0.1:9", "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("rbee: cannot reach the queen at http://127.0.0.1:9")


def test_fleet_view_applies_events_in_order():
    view = FleetView()
    now = utc_now()
    view.apply(HiveTelemetryEvent(hive_id="a", timestamp=now, workers=[worker("w1")]))
    view.apply(HiveTelemetryEvent(hive_id="b", timestamp=now, workers=[worker("w2")]))
    view.apply(HiveStaleEvent(hive_id="a", silent_s=6.0, timestamp=now))
    rendered = view.render()
    assert rendered.startswith("2 hives (1 stale), 2 workers\n")
    (stale_line,) = [line for line in rendered.splitlines() if line.startswith("a ")]
    assert "STALE" in stale_line
    view.apply(HiveTelemetryEvent(hive_id="a", timestamp=now, workers=[]))  # back, no workers
    view.apply(HiveRemovedEvent(hive_id="b", reason="gone", worker_ids=[], timestamp=now))
    assert view.render().startswith("1 hive (0 stale), 0 workers\n")


def test_fleet_view_shows_gpus_mig_and_health():
    """``rbee top``: each hive's GPUs with their health (a MIG instance as ``<gpu>/mig<id>``),
    and a hive degraded by a GPU marks its workers' rows."""
    sick = msgspec.structs.replace(
        gpu(0, total_gib=80, used_gib=8), temperature_c=61.0,
        health=Unhealthy(reason="xid: Xid 79 (GPU has fallen off the bus), 3s ago"))
    mig = msgspec.structs.replace(gpu(1, total_gib=20, used_gib=2), uuid="MIG-1", util_pct=None,
                                  mig_parent_uuid="GPU-00000001", mig_instance_id=3)
    view = FleetView()
    view.apply(HiveTelemetryEvent(
        hive_id="a", timestamp=utc_now(), capabilities=[sick, mig],
        health_status=Degraded(reason="GPU 0 (GPU-00000000) unhealthy: xid: Xid 79"),
        workers=[worker("w1", gpu_util_pct=None, gpu_indices=[0]),
                 worker("w2", gpu_util_pct=40.0, gpu_indices=[0],
                        gpu_util_source=GpuUtilSource.DEVICE),
                 worker("cpu-only", gpu_util_pct=None)]))
    rendered = view.render()
    w1, w2 = (next(line for line in rendered.splitlines() if f"llm/{w}" in line) for w in ("w1", "w2"))
    assert "  ?  " in w1 and "40~" in w2  # unknown, and a device-wide figure
    cpu_only = next(line for line in rendered.splitlines() if "llm/cpu-only" in line)
    header = next(line for line in rendered.splitlines() if line.startswith("HIVE"))
    gpu_cells = cpu_only[header.index("GPU%"):header.index("RUN")].split()
    assert gpu_cells == ["-", "-"], cpu_only  # on no GPU: absent, neither 0 nor unknown
    assert "hive degraded: GPU 0 (GPU-00000000) unhealthy" in w1
    gpu0 = next(line for line in rendered.splitlines() if line.startswith("a ") and "test gpu" in line
                and " 0 " in line[14:26])
    assert "UNHEALTHY: xid: Xid 79" in gpu0 and "8192/81920" in gpu0
    mig_line = next(line for line in rendered.splitlines() if "1/mig3" in line)
    assert "2048/20480" in mig_line and "  ?  " in mig_line and mig_line.rstrip().endswith("ok")


def test_fleet_view_trends_from_history():
    """LAST 60s: GPU % for a worker on a GPU, else CPU % (scaled to its own peak past 100 %)."""
    view = FleetView()
    view.apply(HiveTelemetryEvent(hive_id="a", timestamp=utc_now(),
                                  workers=[worker("gpu-w"), worker("cpu-w")]))
    view.apply_history({"series": [
        {"hive": "a", "group": "llm", "instance": "gpu-w", "metric": "gpu_util_pct",
         "values": [0.0, 50.0, 100.0, None]},
        {"hive": "a", "group": "llm", "instance": "gpu-w", "metric": "cpu_pct",
         "values": [300.0, 300.0, 300.0, 300.0]},
        {"hive": "a", "group": "llm", "instance": "cpu-w", "metric": "gpu_util_pct",
         "values": [None, 0.0, None, 0.0]},
        {"hive": "a", "group": "llm", "instance": "cpu-w", "metric": "cpu_pct",
         "values": [0.0, 100.0, 200.0, None]},
        {"hive": "a", "gpu": "GPU-0", "metric": "util_pct", "values": [1.0]}]})
    lines = view.render().splitlines()
    assert "▁▅█ " in next(line for line in lines if "llm/gpu-w" in line)
    assert "▁▅█ " in next(line for line in lines if "llm/cpu-w" in line)  # 100 of its 200 peak


@pytest.mark.parametrize("args, message", [
    (["workers", "--min-free-vram", "lots"], "invalid float value: 'lots'"),
    (["workers", "--max-waiting", "1.5"], "invalid int value: '1.5'"),
    (["up", "--port", "x"], "invalid int value: 'x'"),
])
def test_rbee_bad_arguments(args, message):
    result = rbee(*args)
    assert result.returncode == 2 and message in result.stderr


async def test_rbee_workers_last_minute_from_history_and_plugin_columns(nursery):
    """LAST 60s is filled from the queen's history (one request), and ``--columns`` shows
    plugin figures: the value, or ``-`` for a worker whose hive reports none."""
    queen = await start_queen(nursery)
    async with httpx.AsyncClient() as client:
        await post_heartbeat(client, queen, heartbeat("gpu-07", [
            worker("a", metrics={"ctxsw.procs": 7.0}), worker("b")]))

        def recorded() -> bool:
            answer = httpx.get(f"{url_of(queen)}/v1/history",
                               params={"metric": "cpu_pct", "since": "60"}).json()
            return any(v is not None for s in answer["series"] for v in s["values"])

        with trio.fail_after(10):
            while not await trio.to_thread.run_sync(recorded):
                await trio.sleep(0.2)
    result = await trio.to_thread.run_sync(lambda: rbee(
        "workers", "--queen", url_of(queen), "--columns", "ctxsw.procs", timeout=20))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    trend, plugin = header.index("LAST 60s"), header.index("ctxsw.procs")
    a, b = (next(line for line in lines if f"llm/{w} " in line) for w in ("a", "b"))
    assert a[trend:plugin].strip() and set(a[trend:plugin].strip()) <= set("▁▂▃▄▅▆▇█ ")
    assert a[plugin:plugin + 12].split() == ["7"] and b[plugin:plugin + 12].split() == ["-"]
    assert lines[-1] == "2 workers"
