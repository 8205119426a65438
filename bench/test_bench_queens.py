"""Several queens on one Redis at fleet scale, measured in queen CPU per heartbeat: this machine
has 2 cores shared with other work, so what a queen spends per heartbeat is the robust figure, not
how many it took per wall second.

The fleet: ``HIVES`` eight-GPU hives (``tests/fleetload.py``: 8 vLLM workers, per-GPU use, engine
state) at 1 Hz, on their channels (a snapshot every fifth beat, deltas of a few workers and all
eight GPUs between) or POSTing the whole heartbeat. Real ``rbee-queen`` processes pinned to CPU 0,
a real ``redis-server``, the load from processes of its own on CPU 1. In one run, per transport:

- one queen, memory store: CPU per heartbeat (the reference);
- one queen, redis store: CPU per heartbeat; memory / redis is ingest per queen CPU-second with
  redis against memory (target >= 70 %);
- two queens on one Redis, the hives split between them (as a load balancer would): each queen
  takes its share and mirrors the other queen's from the stream. The busiest queen's CPU per
  heartbeat of the whole fleet against one queen's: how much more fleet two queens carry before
  one of them runs out of its core (target >= 1.8x). By default the fleet is the one queen's,
  so each takes half of it; with ``RBEE_BENCH_QUEENS_EACH=1`` it is twice that, so each queen
  takes what the one queen took and both are compared where their event loops are as busy (a
  loop with fewer events per wakeup spends more per event).

Each figure is marginal: the fleet is measured at ``SMALL`` then ``HIVES`` hives, and the
queen's extra CPU-seconds (``/proc``: every thread, glide's Rust core included) per extra
heartbeat answered (the queens' ``rbee_queen_heartbeats_received`` counters) is what a heartbeat
costs once the queen's fixed work (its loops, the lease, idle reads of the stream) is set aside,
which at a few hundred heartbeats a second would otherwise weigh as much as the heartbeats: it is
the figure that says when a queen's core runs out. Redis's CPU per heartbeat the same way.
``RBEE_BENCH_QUEENS_HIVES`` sets the fleet (default 500; ``SMALL`` is two fifths of it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.hostilekit import raise_descriptor_limit
from tests.rediskit import running_redis

from .conftest import FIGURES
from .test_bench_hostile import stop
from .test_bench_queen import cpu_seconds, queen_process

REPO = Path(__file__).parents[1]
HIVES = int(os.environ.get("RBEE_BENCH_QUEENS_HIVES", "500"))
SMALL = HIVES * 2 // 5
EACH = os.environ.get("RBEE_BENCH_QUEENS_EACH") == "1"
WARMUP_S = 3.0
WINDOW_S = 5.0
WINDOWS = 3
"""Windows measured at each size, their median taken (other work on this machine comes and goes)."""
QUEEN_CONFIG = {
    "http": {"max_connections": HIVES + 512},
    "registry": {"max_hives": HIVES * 2, "new_hives_per_s": 1e6, "new_hives_burst": HIVES * 2},
}
RESULTS: dict[tuple[str, str], list[float]] = {}
"""(transport, setup): each queen's CPU-seconds per heartbeat of the whole fleet."""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis-queens")) as server:
        yield server


COUNTER = "rbee_queen_heartbeats_received_total"


def received(url: str) -> float:
    """The queen's ``rbee_queen_heartbeats_received`` counter, asked for by name: a whole
    ``/metrics`` lists the fleet (up to ``metrics.max_workers`` workers, 73 MB and over a second
    of the queen's core at 2,400 hives), which the windows would count as ingest, and which
    does not halve with a second queen."""
    for line in httpx.get(f"{url}/metrics", params={"name[]": COUNTER},
                          timeout=10).text.splitlines():
        if line.startswith(COUNTER):
            return float(line.split()[-1])
    raise AssertionError(f"no {COUNTER} in {url}/metrics")


@contextmanager
def fleet_load(url: str, transport: str, prefix: str) -> Iterator[Callable[[int], None]]:
    """A fleet's load process beating at ``url`` (hive ids ``prefix-NNNNN``) until closed;
    gives the function that grows it to a number of hives (returning once they all connected
    and warmed up)."""
    port = url.rsplit(":", 1)[1]
    load = subprocess.Popen(  # inherits this process's CPU (1) from queen_process
        [sys.executable, "-m", "tests.fleetload", port, "--warmup-s", str(WARMUP_S),
         "--window-s", "0.1", "--prefix", prefix,
         *(["--channel"] if transport == "channel" else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def grow(hives: int) -> None:
        load.stdin.write(f"{hives}\n")
        load.stdin.flush()
        # its own window (a tenth of a second) opens once the fleet is warm; its hives beat
        # on after it while it waits for the next line
        for expected in ("start", "end", "{"):
            line = load.stdout.readline()
            assert line.startswith(expected), f"the load process said {line!r}"

    try:
        yield grow
    finally:
        load.stdin.close()
        stop(load)


def sample(queens: list[tuple[subprocess.Popen, str]], redis_pid: int | None
           ) -> tuple[list[float], float, float, float]:
    """Over about ``WINDOW_S``: each queen's CPU-seconds, Redis's, the heartbeats answered,
    and the seconds it took."""
    cpu = [cpu_seconds(q.pid) for q, _ in queens]
    count = sum(received(url) for _, url in queens)
    redis_cpu = cpu_seconds(redis_pid) if redis_pid else 0.0
    began = time.monotonic()
    time.sleep(WINDOW_S)
    heartbeats = sum(received(url) for _, url in queens) - count
    return ([cpu_seconds(q.pid) - before for (q, _), before in zip(queens, cpu, strict=True)],
            (cpu_seconds(redis_pid) - redis_cpu) if redis_pid else 0.0, heartbeats,
            time.monotonic() - began)


def measure(queens: list[tuple[subprocess.Popen, str]], loads: list[Callable[[int], None]],
            redis_pid: int | None) -> tuple[list[float], float, float]:
    """Each queen's marginal CPU-seconds per heartbeat of the whole fleet, Redis's, and the
    fleet's heartbeats per second at ``HIVES``."""
    windows = []
    share = len(loads) if not EACH else 1
    for hives in (SMALL, HIVES):
        for grow in loads:
            grow(hives // share)
        # the median of WINDOWS windows, each queen's and Redis's CPU per heartbeat alike
        taken = sorted((sample(queens, redis_pid) for _ in range(WINDOWS)),
                       key=lambda window: max(window[0]) / window[2])
        windows.append(taken[len(taken) // 2])
        expected = hives // share * len(loads) * WINDOW_S
        assert windows[-1][2] > 0.8 * expected, f"{windows[-1][2]:.0f} of {expected} answered"
    (cpu_small, redis_small, hb_small, _), (cpu_big, redis_big, hb_big, seconds) = windows
    more = hb_big - hb_small
    return ([(big - small) / more for small, big in zip(cpu_small, cpu_big, strict=True)],
            (redis_big - redis_small) / more, hb_big / seconds)


def config(store: dict) -> str:
    return yaml.safe_dump({**QUEEN_CONFIG,
                           "registry": {**QUEEN_CONFIG["registry"], "store": store}})


@pytest.mark.parametrize("transport", ["channel", "post"])
@pytest.mark.parametrize("setup", ["memory", "redis", "redis x2"])
def test_queens(benchmark, tmp_path, redis_server, setup, transport):
    raise_descriptor_limit(2 * HIVES + 1024)  # the queens and the load processes inherit it
    store = ({"kind": "memory"} if setup == "memory" else
             {"kind": "redis", "url": redis_server.url,
              "key_prefix": f"bench-{transport}-{setup.replace(' ', '')}"})
    names = ["a", "b"] if setup == "redis x2" else ["a"]
    outcome: list = []
    with ExitStack() as stack:
        queens = []
        for name in names:
            directory = tmp_path / name
            directory.mkdir()
            queens.append(stack.enter_context(queen_process(directory, config(store))))
        loads = [stack.enter_context(fleet_load(url, transport, f"h{k}"))
                 for k, (_, url) in enumerate(queens)]

        def run() -> None:
            outcome[:] = measure(queens, loads,
                                 None if setup == "memory" else redis_server.process.pid)

        benchmark.pedantic(run, rounds=1, iterations=1)
    per_hb, redis_per_hb, rate = outcome
    RESULTS[transport, setup] = per_hb
    FIGURES[f"queens, {transport}, {setup}"] = (
        f"{rate:,.0f} heartbeats/s; queen CPU per heartbeat of the fleet "
        f"({SMALL} to {HIVES} hives{' a queen' if EACH else ''}) "
        + ", ".join(f"{s * 1e6:.0f} us" for s in per_hb)
        + (f"; Redis {redis_per_hb * 1e6:.1f} us" if setup != "memory" else ""))
    summarize(transport)
    assert all(s > 0 for s in per_hb)


def summarize(transport: str) -> None:
    got = {setup: RESULTS.get((transport, setup)) for setup in ("memory", "redis", "redis x2")}
    if got["memory"] and got["redis"]:
        FIGURES[f"queens, {transport}: ingest per CPU-second, redis / memory"] = (
            f"{got['memory'][0] / got['redis'][0]:.0%} (target >= 70 %)")
    if got["redis"] and got["redis x2"]:
        FIGURES[f"queens, {transport}: two queens carry, against one"] = (
            f"{got['redis'][0] / max(got['redis x2']):.2f}x (target >= 1.8x)")
