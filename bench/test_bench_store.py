"""The redis store against the memory store, measured in CPU (this machine has 2 cores, so wall
throughput says little): real ``rbee-queen`` processes, a real ``redis-server``, heartbeats of
100 workers posted over HTTP from this process.

- ingest: heartbeats per queen CPU-second, redis store against memory store (target >= 70 %);
- Redis CPU per heartbeat, hence how many queens one Redis core carries (target >= 10);
- two queens sharing one Redis against one queen: heartbeats per CPU-second of all queens
  together (each queen also follows the other's heartbeats on the stream, to mirror the fleet);
- Redis memory for 1,000 hives of 10 workers (their records plus the stream's retained entries).

CPU is read from /proc/<pid>/stat (utime + stime of every thread: glide's Rust core included).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
import trio
import yaml

from rbee.contract import encode
from tests.builders import fleet_heartbeat
from tests.rediskit import RedisServer, running_redis

from .conftest import FIGURES
from .test_bench_queen import TWO_CORES, cpu_seconds, pinned, post_all, queen_process

HIVES = 16
PER_ROUND = 480
ROUNDS = 3
RESULTS: dict[str, float] = {}
"""Heartbeats per queen CPU-second by setup, and Redis CPU-seconds per heartbeat."""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis-bench")) as server:
        yield server


@contextmanager
def queen_with(tmp_path, name: str, store: dict) -> Iterator[tuple[subprocess.Popen, str]]:
    directory = tmp_path / name
    directory.mkdir()
    with queen_process(directory, yaml.safe_dump({"registry": {"store": store}})) as queen:
        yield queen


def redis_store(server: RedisServer, prefix: str) -> dict:
    return {"kind": "redis", "url": server.url, "key_prefix": prefix}


def ingest(benchmark, queens: list[tuple[subprocess.Popen, str]], redis_pid: int | None
           ) -> tuple[float, float]:
    """Rounds of PER_ROUND heartbeats spread over the queens; (heartbeats per CPU-second of
    all queens together, Redis CPU-seconds per heartbeat)."""
    bodies = [encode(fleet_heartbeat(f"hive-{i:03}", 100)) for i in range(HIVES)]
    share = len(bodies) // len(queens)
    groups = [(url, bodies[k * share:(k + 1) * share]) for k, (_, url) in enumerate(queens)]

    async def post_everywhere(total: int) -> None:
        async with trio.open_nursery() as nursery:
            for url, group in groups:
                nursery.start_soon(post_all, url, group, total // len(groups))

    trio.run(post_everywhere, len(bodies))  # warm up
    used: list[float] = []
    redis_used: list[float] = []

    def one_round() -> None:
        before = sum(cpu_seconds(p.pid) for p, _ in queens)
        redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
        trio.run(post_everywhere, PER_ROUND)
        used.append(sum(cpu_seconds(p.pid) for p, _ in queens) - before)
        redis_used.append((cpu_seconds(redis_pid) - redis_before) if redis_pid else 0.0)

    with pinned({1} if TWO_CORES else os.sched_getaffinity(0)):
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    time.sleep(0.2)  # followers finish reading the stream
    return PER_ROUND / statistics.median(used), statistics.median(redis_used) / PER_ROUND


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_store_ingest(benchmark, tmp_path, redis_server, kind):
    store = {"kind": "memory"} if kind == "memory" else redis_store(redis_server, "bench-one")
    with queen_with(tmp_path, kind, store) as queen:
        rate, redis_per_hb = ingest(benchmark, [queen], redis_server.process.pid
                                    if kind == "redis" else None)
    RESULTS[kind] = rate
    FIGURES[f"ingest, one queen, {kind} store"] = (
        f"{rate:,.0f} heartbeats (100 workers) per queen CPU-second")
    if kind == "redis":
        RESULTS["redis_cpu_per_hb"] = redis_per_hb
        FIGURES["Redis CPU per heartbeat"] = (
            f"{redis_per_hb * 1e6:,.0f} us: one Redis core takes {1 / redis_per_hb:,.0f}/s, "
            f"the ingest of {1 / redis_per_hb / rate:.1f} queens")
        if "memory" in RESULTS:
            FIGURES["ingest, redis store / memory store"] = (
                f"{rate / RESULTS['memory']:.0%} (target >= 70 %)")
    assert rate > 0


def test_two_queens_against_one(benchmark, tmp_path, redis_server):
    with ExitStack() as stack:
        queens = [stack.enter_context(queen_with(tmp_path, name,
                                                    redis_store(redis_server, "bench-two")))
                  for name in ("a", "b")]
        rate, _ = ingest(benchmark, queens, None)
    FIGURES["ingest, two queens on one Redis"] = (
        f"{rate:,.0f} heartbeats per CPU-second of both queens together"
        + (f"; one queen: {RESULTS['redis']:,.0f} ({rate / RESULTS['redis']:.0%} per CPU-second,"
           f" so two queens' cores take {2 * rate / RESULTS['redis']:.2f}x one queen's)"
           if "redis" in RESULTS else ""))
    assert rate > 0


def test_redis_memory_per_1000_hives(benchmark, tmp_path, redis_server):
    """1,000 hives of 10 workers, one heartbeat each, through one queen: what Redis holds."""
    bodies = [encode(fleet_heartbeat(f"mem-{i:04}", 10)) for i in range(1000)]
    with queen_with(tmp_path, "mem", redis_store(redis_server, "bench-mem")) as (_, url):
        before = int(redis_server.info("memory")["used_memory"])

        async def connection(share: list[bytes]) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
                for body in share:
                    response = await client.post("/v1/hive-heartbeat", content=body)
                    assert response.status_code == 200

        async def post_each_once() -> None:
            async with trio.open_nursery() as nursery:
                for k in range(HIVES):  # HIVES connections, each posting its share once
                    nursery.start_soon(connection, bodies[k::HIVES])

        def post_once() -> None:
            trio.run(post_each_once)

        benchmark.pedantic(post_once, rounds=1, iterations=1)
        after = int(redis_server.info("memory")["used_memory"])
    mib = (after - before) / 2**20
    FIGURES["Redis memory, 1,000 hives x 10 workers"] = (
        f"{mib:.1f} MiB ({len(bodies[0]) / 1024:.1f} KiB per heartbeat as JSON; records plus "
        f"the stream's last {len(bodies)} entries)")
    assert after > before
