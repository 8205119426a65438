"""The pipeline end to end. Targets: a heartbeat of 100 workers < 25 KB on the wire; spawn → SSE
client p99 < 20 ms through real ``rbee-queen`` and ``rbee-hive`` processes.

Where a spawn's time goes (``test_spawn_breakdown``): the same spawns through a hive run in this
process (its product objects, each stage's end time-stamped by wrapping the method that ends it)
and a real queen, over the channel and over POST; each stage is reported as the time from the
POST to its end.

The payload is measured on a real hive's heartbeat (100 workers in real cgroups, with limits) and,
for a GPU hive, on a heartbeat with every GPU field filled; each as JSON and as sent (gzip, the
default). Spawn latency runs from just before the hive's ``POST /v1/workers`` to the moment the
stream client's socket delivers the first event naming the new worker; it includes the fork, the
cgroup set-up and the first collection. With ``RBEE_BENCH_BEFORE=/path/to/a/checkout`` (as in
bench/test_bench_queen.py) the spawn latency is measured through that checkout's queen and hive
too, in the same run.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import yaml

from rbee.config import HiveConfig, parse_config
from rbee.contract import encode
from rbee.hive import channel
from rbee.hive.agent import HiveAgent
from rbee.hive.service import HiveService
from tests.builders import fleet_heartbeat
from tests.daemons import Daemon

from .conftest import FIGURES
from .test_bench_queen import schedstat


def wire(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1, mtime=0)


async def real_heartbeat(workers: int) -> bytes:
    config = parse_config({
        "id": "gpu-node-017", "stop_workers_on_exit": True, "collect": {"gpu": "none"},
        "cgroup": {"root": "rbee-bench-payload"},  # removed with the workers at the end
        "workers": [{"group": "llm", "instance": f"worker-{i:03}", "argv": ["sleep", "600"],
                     "cpu_limit": "400%", "memory_limit": "32G"} for i in range(workers)]},
        HiveConfig)
    agent = HiveAgent(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await agent.wait_changed()  # a second sample: rates measured
        body = encode(agent.latest)
        nursery.cancel_scope.cancel()
    return body


def test_heartbeat_payload_size(benchmark):
    body = trio.run(real_heartbeat, 100)
    gpu_body = encode(fleet_heartbeat("gpu-node-017", 100))
    compressed = benchmark(wire, gpu_body)  # the sender's cost per heartbeat
    FIGURES["heartbeat, 100 workers (real, cgroups, no GPU)"] = (
        f"{len(body) / 1000:.1f} KB JSON, {len(wire(body)) / 1000:.1f} KB sent (gzip)")
    FIGURES["heartbeat, 100 workers (every GPU field set)"] = (
        f"{len(gpu_body) / 1000:.1f} KB JSON, {len(compressed) / 1000:.1f} KB sent (gzip), "
        f"gzip costs {benchmark.stats.stats.median * 1e3:.2f} ms")
    assert gzip.decompress(compressed) == gpu_body


BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
SIDES = ["after", "before"] if BEFORE else ["after"]


def daemon(name: str, side: str, config: Path, text: str, **kwargs) -> Daemon:
    """``rbee-queen`` or ``rbee-hive`` from this tree, or (``before``) from RBEE_BENCH_BEFORE's
    (where ``rbee/collectors`` must lead to its ``collectors/``: ``ln -s ../collectors``)."""
    if side == "after":
        return Daemon(f"rbee-{name}", config, text, **kwargs)
    config.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(BEFORE), "PYTHONDONTWRITEBYTECODE": "1"}
    # this tree is neither the working directory (-P) nor, through this venv's editable install,
    # where rbee's packages are found
    argv = [sys.executable, "-P", "-c", "import sys; sys.meta_path[:] = [finder for finder in "
            "sys.meta_path if 'editable' not in repr(finder)]; "
            f"from rbee.{name}.main import main; sys.exit(main())",
            "--config", str(config), "--log-level", "INFO"]
    return Daemon.from_argv(argv, config.with_suffix(".stderr"), env=env, **kwargs)


@pytest.fixture(params=SIDES)
def pipeline(tmp_path, request):
    side = request.param
    hive_yaml = {"id": "bench-hive", "port": 0, "stop_workers_on_exit": True,
                 "cgroup": {"root": "rbee-bench-spawn"}, "collect": {"gpu": "none"}}
    with daemon("queen", side, tmp_path / "queen.yaml", "port: 0\n") as queen, \
            daemon("hive", side, tmp_path / "hive.yaml", yaml.safe_dump(
                {**hive_yaml, "queen_url": queen.url}), cgroup_root="rbee-bench-spawn") as hive:
        yield queen.url, hive.url, side, (queen.process.pid, hive.process.pid)


SPAWNS = 30


async def spawn_latencies(queen_url: str, hive_url: str, stamps: dict[str, float] | None = None
                          ) -> list[float]:
    """Each spawn's latency; with ``stamps``, each spawn's stamps too (as ms from its POST), as
    the hive's wrapped methods set them, in ``stamps["spawns"]``."""
    host, port = queen_url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    await sock.send(b"GET /v1/heartbeats/stream HTTP/1.1\r\nHost: q\r\n\r\n")
    buffer = b""
    while b"snapshot" not in buffer:
        buffer += await sock.recv(65536)
    latencies = []
    async with httpx.AsyncClient(base_url=hive_url, timeout=10) as client:
        for k in range(SPAWNS):
            marker = f"spawn-{k:03}".encode()
            if stamps is not None:
                stamps.clear()
            started = time.perf_counter()
            response = await client.post("/v1/workers", json={
                "group": "bench", "instance": marker.decode(), "argv": ["sleep", "600"]})
            answered = time.perf_counter()
            assert response.status_code == 201, response.text
            tail = b""
            while True:
                chunk = await sock.recv(65536)
                if marker in tail + chunk:
                    latencies.append(time.perf_counter() - started)
                    break
                tail = chunk[-32:]
            if stamps is not None:
                stamps.update({"the POST answered": answered,
                               "the stream client has it": started + latencies[-1]})
                SPAWN_STAMPS.append({stage: (at - started) * 1e3 for stage, at in stamps.items()})
            await client.delete(f"/v1/workers/bench/{marker.decode()}")
            await trio.sleep(0.05)
    sock.close()
    return latencies


def test_spawn_to_sse_latency(benchmark, pipeline):
    samples: list[float] = []

    queen_url, hive_url, side, pids = pipeline

    def one_round() -> None:
        samples.extend(trio.run(spawn_latencies, queen_url, hive_url))

    waited = sum(schedstat(pid)[1] for pid in pids)
    benchmark.pedantic(one_round, rounds=2, iterations=1)
    waited = sum(schedstat(pid)[1] for pid in pids) - waited
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3
    FIGURES[f"spawn -> SSE client (real processes, {side})"] = (
        f"p50 {statistics.median(samples) * 1e3:.1f} ms, p99 {p99:.1f} ms, "
        f"max {samples[-1] * 1e3:.1f} ms ({len(samples)} spawns); the hive and the queen "
        f"waited {waited * 1e3:.0f} ms on a run queue for a core")
    assert len(samples) == 2 * SPAWNS


SPAWN_STAMPS: list[dict[str, float]] = []


def stamp_after(stamps: dict[str, float], owner: object, method: str, stage: str,
                monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap ``owner.method`` so that the first call of each spawn to return sets ``stage``."""
    original = getattr(owner, method)
    if inspect.iscoroutinefunction(original):
        async def wrapped(*args, **kwargs):
            result = await original(*args, **kwargs)
            stamps.setdefault(stage, time.perf_counter())
            return result
    else:
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            stamps.setdefault(stage, time.perf_counter())
            return result
    monkeypatch.setattr(owner, method, functools.wraps(original)(wrapped))


def stamp_before(stamps: dict[str, float], owner: object, method: str, stage: str,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap ``owner.method`` so that the first call of each spawn sets ``stage`` as it begins."""
    original = getattr(owner, method)
    if inspect.iscoroutinefunction(original):
        async def wrapped(*args, **kwargs):
            stamps.setdefault(stage, time.perf_counter())
            return await original(*args, **kwargs)
    else:
        def wrapped(*args, **kwargs):
            stamps.setdefault(stage, time.perf_counter())
            return original(*args, **kwargs)
    monkeypatch.setattr(owner, method, functools.wraps(original)(wrapped))


async def traced_spawns(queen_url: str, transport: str, monkeypatch: pytest.MonkeyPatch
                        ) -> list[float]:
    config = parse_config({
        "id": "bench-hive", "port": 0, "stop_workers_on_exit": True, "queen_url": queen_url,
        "cgroup": {"root": "rbee-bench-breakdown"}, "collect": {"gpu": "none"},
        "heartbeat": {"transport": transport}}, HiveConfig)
    hive = HiveService(config)
    agent, stamps = hive.agent, {}
    stamp_before(stamps, hive, "spawn", "the hive's handler has it", monkeypatch)
    stamp_after(stamps, agent.monitor.backend, "create", "cgroup made, limits written",
                monkeypatch)
    stamp_after(stamps, agent.monitor, "_start", "process started", monkeypatch)
    stamp_after(stamps, agent.monitor, "spawn", "spawn announced", monkeypatch)
    stamp_before(stamps, agent.collector, "collect_all", "collection begins", monkeypatch)
    stamp_after(stamps, agent.collector, "collect_all", "collection done", monkeypatch)
    stamp_after(stamps, agent, "_set_latest", "heartbeat published", monkeypatch)
    if transport == "channel":
        stamp_after(stamps, channel.FrameMaker, "frame", "frame made", monkeypatch)
    else:
        stamp_before(stamps, hive.sender, "send", "POST begins", monkeypatch)
    async with trio.open_nursery() as nursery:
        await nursery.start(hive.run)
        while hive.sender.state.delivered == 0:
            await trio.sleep(0.01)
        latencies = await spawn_latencies(queen_url, hive.urls[0], stamps)
        hive.stop()
    return latencies


@pytest.mark.parametrize("transport", ["channel", "post"])
def test_spawn_breakdown(benchmark, tmp_path, transport, monkeypatch):
    SPAWN_STAMPS.clear()
    with Daemon("rbee-queen", tmp_path / "queen.yaml", "port: 0\n") as queen:
        benchmark.pedantic(lambda: trio.run(traced_spawns, queen.url, transport, monkeypatch),
                           rounds=2, iterations=1)
    stages = sorted(SPAWN_STAMPS[0], key=lambda stage: statistics.median(
        spawn[stage] for spawn in SPAWN_STAMPS))
    for stage in stages:
        values = sorted(spawn[stage] for spawn in SPAWN_STAMPS)
        FIGURES[f"spawn breakdown ({transport}): {stage}"] = (
            f"p50 {statistics.median(values):.2f} ms, p99 "
            f"{values[min(len(values) - 1, int(len(values) * 0.99))]:.2f} ms after the POST")
    assert len(SPAWN_STAMPS) == 2 * SPAWNS and all(len(s) == len(stages) for s in SPAWN_STAMPS)
