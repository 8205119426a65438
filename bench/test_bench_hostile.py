"""The queen under 1,000 hostile connections of each kind, while a real ``rbee-hive`` heartbeats to
it every 0.5 s: what the hive gets through, how long it goes without, what the queen's memory and
``/health`` do. Each scenario runs against this tree's queen ("after") and, with
``RBEE_BENCH_BEFORE=/path/to/a/checkout`` (say ``git archive main | tar -x -C /tmp/rbee-main``,
plus the built ``rbee/_c*.so`` copied in), against that checkout's queen ("before"), in the
same run, and prints both and the ratio. Both queens run with RLIMIT_NOFILE 1024 (systemd's
default without ``LimitNOFILE``). The hostile connections come from a process of their own
(``python -m tests.hostilekit``), so that the one measuring (the hive's deliveries, read from
its /health; a ``GET /health`` of the queen on a new connection every 0.2 s; the queen's RSS)
is not slowed by them.

Scenarios (tests/test_hardening.py has the fast versions):
- ``slow-headers``: 1,000 connections sending one header byte every 2 s;
- ``slow-body``: 1,000 connections with ``Content-Length: 4194304``, one body byte every 2 s;
- ``idle``: 1,500 idle sockets (more than the descriptors);
- ``big-bodies``: 1,000 connections each sending 512 KiB of a 4 MiB - 1 body, then nothing;
- ``h2c``: 1,000 HTTP/2 prior-knowledge connections over plain TCP;
- ``stalled-stream``: 100 stream clients that never read, while 315 KB heartbeats (1,024
  workers) are posted 4 times a second (1,000 of them would pin 1,000 backlogs).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import trio
import yaml

from rbee.contract import encode
from tests.builders import fleet_heartbeat
from tests.hostilekit import raise_descriptor_limit

from .conftest import FIGURES

BIN = Path(sys.executable).parent
REPO = Path(__file__).parents[1]
BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
WINDOW_S = 15.0
QUEEN_FILES = 1024

SCENARIOS = {
    # name: (connections, seconds watched); the kinds are tests/hostilekit.py's KINDS
    "slow-headers": (1000, WINDOW_S),
    "slow-body": (1000, WINDOW_S),
    "idle": (1500, WINDOW_S),
    "big-bodies": (1000, WINDOW_S),
    "h2c": (1000, WINDOW_S),
    "stalled-stream": (100, 25.0),
}
AFTER_HTTP = {"header_timeout_s": 5.0, "body_timeout_s": 5.0}
"""This tree's queen, with the phase timeouts shortened so the window sees them act."""


def queen_command(side: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if side == "before":
        env["PYTHONPATH"] = BEFORE
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # this tree is neither the working directory (-P) nor, through this venv's editable
        # install, where rbee's packages are found
        return [sys.executable, "-P", "-c", "import sys; sys.meta_path[:] = [finder for finder in "
                                      "sys.meta_path if 'editable' not in repr(finder)]; "
                                      "from rbee.queen.main import main; sys.exit(main())"], env
    return [str(BIN / "rbee-queen")], env


def start(argv: list[str], config: Path, text: dict, env: dict[str, str] | None = None,
          files: int | None = None) -> tuple[subprocess.Popen, str]:
    config.write_text(yaml.safe_dump(text))

    def limit() -> None:
        if files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    process = subprocess.Popen([*argv, "--config", str(config), "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env, preexec_fn=limit)
    line = process.stdout.readline()
    assert "listening on http://" in line, line
    return process, line.split()[-1]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


async def hive_deliveries(hive_url: str, seconds: float) -> tuple[int, float]:
    """Heartbeats the hive delivered over ``seconds`` (its /health), and the longest gap."""
    async with httpx.AsyncClient(base_url=hive_url, timeout=5.0) as client:
        async def delivered() -> int:
            return (await client.get("/health")).json()["queen"]["delivered"]

        started = last_change = trio.current_time()
        first = last = await delivered()
        gap = 0.0
        while trio.current_time() - started < seconds:
            await trio.sleep(0.1)
            count = await delivered()
            if count != last:
                now = trio.current_time()
                gap, last_change, last = max(gap, now - last_change), now, count
        return last - first, max(gap, trio.current_time() - last_change)


async def health_probe(url: str, latencies: list[float]) -> None:
    while True:
        before = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                await client.get(f"{url}/health")
            latencies.append(time.perf_counter() - before)
        except httpx.HTTPError:
            latencies.append(float("inf"))
        await trio.sleep(0.2)


async def stalled_stream(url: str, count: int, nursery: trio.Nursery) -> list[socket.socket]:
    port = int(url.rsplit(":", 1)[1])
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /v1/heartbeats/stream HTTP/1.1\r\nhost: q\r\n\r\n")
        sockets.append(sock)
    body = encode(fleet_heartbeat("big-hive", 1024))

    async def publish() -> None:
        async with httpx.AsyncClient(timeout=60.0) as client:
            while True:
                try:
                    await client.post(f"{url}/v1/hive-heartbeat", content=body,
                                      headers={"content-type": "application/json"})
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.25)

    nursery.start_soon(publish)
    return sockets


async def scenario(name: str, queen_url: str, hive_url: str, queen_pid: int) -> dict[str, float]:
    """Hostile connections from a process of their own (tests/hostilekit.py), while this one
    watches the hive's deliveries, probes /health and samples the queen's memory."""
    count, seconds = SCENARIOS[name]
    process = psutil.Process(queen_pid)
    rss_before = process.memory_info().rss
    latencies: list[float] = []
    peak = rss_before
    sockets: list[socket.socket] = []
    attacker = None
    async with trio.open_nursery() as attack:
        if name == "stalled-stream":
            sockets = await stalled_stream(queen_url, count, attack)
        else:
            attacker = subprocess.Popen(
                [sys.executable, "-m", "tests.hostilekit", name, queen_url.rsplit(":", 1)[1],
                 str(count), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        attack.start_soon(health_probe, queen_url, latencies)

        async def watch_memory() -> None:
            nonlocal peak
            while True:
                peak = max(peak, process.memory_info().rss)
                await trio.sleep(0.2)

        attack.start_soon(watch_memory)
        delivered, gap = await hive_deliveries(hive_url, seconds)
        attack.cancel_scope.cancel()
    for sock in sockets:
        sock.close()
    hostile = {}
    if attacker is not None:
        output, _ = await trio.to_thread.run_sync(lambda: attacker.communicate(timeout=60))
        hostile = json.loads(output.splitlines()[-1])
    await trio.sleep(2.0)
    finite = [latency for latency in latencies if latency != float("inf")] or [float("inf")]
    return {"delivered": delivered, "longest_gap_s": gap,
            "health_p50_ms": statistics.median(finite) * 1e3,
            "health_max_ms": max(latencies or [float("inf")]) * 1e3,
            "health_failed": latencies.count(float("inf")),
            "rss_peak_mb": (peak - rss_before) / 2**20,
            "rss_after_close_mb": (process.memory_info().rss - rss_before) / 2**20,
            **{f"hostile_{key}": value for key, value in hostile.items()}}


SIDES = ["after", "before"] if BEFORE else ["after"]
RESULTS: dict[tuple[str, str], dict[str, float]] = {}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_hostile(benchmark, tmp_path, name, side):
    raise_descriptor_limit(4096)
    argv, env = queen_command(side)
    http = {} if side == "before" else AFTER_HTTP
    queen, queen_url = start(argv, tmp_path / "queen.yaml",
                             {"port": 0, "http": {"max_body_bytes": 4 * 2**20, **http}},
                             env=env, files=QUEEN_FILES)
    try:
        hive, hive_url = start([str(BIN / "rbee-hive")], tmp_path / "hive.yaml", {
            "id": "bench-hive", "port": 0, "queen_url": queen_url, "cgroup": {"backend": "none"},
            "collect": {"gpu": "none"}, "heartbeat": {"interval_s": 0.5}})
        try:
            result = {}

            def run() -> None:
                result.update(trio.run(scenario, name, queen_url, hive_url, queen.pid))

            benchmark.pedantic(run, rounds=1, iterations=1)
        finally:
            stop(hive)
    finally:
        stop(queen)
    FIGURES[f"hostile {name} [{side}]"] = ", ".join(
        f"{key} {value:.0f}" if isinstance(value, int) or abs(value) > 100 else f"{key} {value:.2f}"
        for key, value in result.items())
    RESULTS[name, side] = result
    if side == "before" and (name, "after") in RESULTS:
        after = RESULTS[name, "after"]
        FIGURES[f"hostile {name} before/after"] = ", ".join(
            f"{key} {result[key] / max(after[key], 1e-3):.1f}x"
            for key in ("longest_gap_s", "health_max_ms", "rss_peak_mb"))
    if side == "after":
        assert result["longest_gap_s"] < 3.0, result
        assert result["health_failed"] == 0, result


def test_before_tree_is_usable():
    """Names what the before/after comparison needs, when it is asked for."""
    if not BEFORE:
        pytest.skip("RBEE_BENCH_BEFORE is not set: only this tree's queen is measured")
    assert Path(BEFORE, "rbee", "queen", "main.py").is_file()
    assert any(Path(BEFORE, "rbee").glob("_cstat*.so")) or shutil.which("cc")
