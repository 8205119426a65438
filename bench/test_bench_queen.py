"""The queen under load, as a real ``rbee-queen`` process pinned to CPU 0; the load comes from this
process, pinned to CPU 1. Targets: ingest >= 1,000 heartbeats of 100 workers per second on one
core; SSE fan-out to 100 clients with p99 < 10 ms from ingest to receipt.

Ingest is reported two ways: heartbeats per second of wall time (bounded by the load generator
as well), and heartbeats per CPU-second the queen process used (its own cost, from
/proc/<pid>/stat), which is the "on one core" figure. Fan-out latency runs from just before the
POST is sent to the moment each client's socket delivers the event; clients read raw bytes so
that the client side adds as little as possible. With ``RBEE_BENCH_BEFORE=/path/to/a/checkout``
(``git archive main | tar -x -C /tmp/rbee-main``, plus the built ``rbee/_c*.so`` copied in)
fan-out is measured against that checkout's queen too, in the same run (the machine is shared:
only figures of one run compare).
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from rbee.contract import encode
from tests.builders import fleet_heartbeat

from .conftest import FIGURES

RBEE_QUEEN = str(Path(sys.executable).with_name("rbee-queen"))
BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
SIDES = ["after", "before"] if BEFORE else ["after"]
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
TWO_CORES = len(os.sched_getaffinity(0)) >= 2


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime + stime


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds the process's threads ran, and seconds they waited on a run queue for a core
    (/proc/<pid>/task/*/schedstat, to the nanosecond; a thread that ended meanwhile drops out):
    the second says how much of a latency figure was the machine's other work."""
    ran = waited = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as file:
                fields = file.read().split()
        except OSError:
            continue
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


@contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def queen_process(directory: Path, config_yaml: str, source: Path | None = None
                  ) -> Iterator[tuple[subprocess.Popen, str]]:
    """A fresh ``rbee-queen`` on a free port with ``config_yaml``, pinned to CPU 0, while this
    process runs on CPU 1; from the package in ``source`` (a checkout) if given."""
    config = directory / "queen.yaml"
    config.write_text(f"port: 0\n{config_yaml}")
    command = [RBEE_QUEEN] if source is None else [sys.executable, "-m", "rbee.queen.main"]
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    process = subprocess.Popen(
        [*command, "--config", str(config), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=source,
        preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if TWO_CORES else None)
    try:
        url = process.stdout.readline().split()[-1]
        assert url.startswith("http://127.0.0.1:"), url
        with pinned({1} if TWO_CORES else os.sched_getaffinity(0)):
            yield process, url
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


@pytest.fixture
def queen(tmp_path):
    """A fresh queen for each benchmark, so one's fleet does not weigh on the next."""
    with queen_process(tmp_path, "stream: {client_buffer: 1024, max_clients: 200}\n") as queen:
        yield queen


# -- ingest -------------------------------------------------------------------------------

HIVES = 32
ROUND = 3000


async def post_all(url: str, bodies: list[bytes], total: int) -> None:
    """``total`` POSTs from ``len(bodies)`` concurrent hives, each on its own connection."""
    per_hive = total // len(bodies)

    async def hive(body: bytes) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
            for _ in range(per_hive):
                response = await client.post("/v1/hive-heartbeat", content=body)
                assert response.status_code == 200

    async with trio.open_nursery() as nursery:
        for body in bodies:
            nursery.start_soon(hive, body)


def test_queen_ingest(benchmark, queen):
    process, url = queen
    bodies = [encode(fleet_heartbeat(f"hive-{i:03}", 100)) for i in range(HIVES)]
    total = HIVES * (ROUND // HIVES)
    trio.run(post_all, url, bodies, HIVES)  # warm up connections and the queen
    used: list[float] = []

    def one_round() -> None:
        before = cpu_seconds(process.pid)
        trio.run(post_all, url, bodies, total)
        used.append(cpu_seconds(process.pid) - before)

    benchmark.pedantic(one_round, rounds=5, iterations=1)
    wall = benchmark.stats.stats.median
    per_cpu_second = total / statistics.median(used)
    FIGURES["queen ingest, 100-worker heartbeats"] = (
        f"{total / wall:,.0f}/s wall, {per_cpu_second:,.0f} per queen CPU-second "
        f"({len(bodies[0]) / 1024:.1f} KiB each, {HIVES} concurrent hives)")
    benchmark.extra_info.update(per_cpu_second=per_cpu_second, wall_rate=total / wall)
    assert per_cpu_second > 0


# -- SSE fan-out --------------------------------------------------------------------------

CLIENTS = 100
EVENTS = 60
GAP_S = 0.05
RECV_SIZE = 65536


def fan_out(url: str, workers: int) -> list[float]:
    """Latency of every (event, client) pair, in seconds.

    The clients are plain non-blocking sockets read by one thread through epoll, and the
    heartbeat goes out as prepared bytes on a kept-alive socket: per receipt the client side
    costs a ``recv`` and a search (a trio task per client, or httpx for the POST, added several
    milliseconds of their own to every figure, as much as the queen took)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    address = (host, int(port))
    markers = [f"mark-{k:05}".encode() for k in range(EVENTS)]
    clients = []
    for _ in range(CLIENTS):
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(b"GET /v1/heartbeats/stream HTTP/1.1\r\nHost: q\r\n\r\n")
        buffer = b""
        while b"snapshot" not in buffer:
            buffer += sock.recv(RECV_SIZE)
        sock.setblocking(False)
        clients.append(sock)
    poster = socket.create_connection(address, timeout=10)
    template = fleet_heartbeat("fan-out", workers)
    latencies: list[float] = []
    with select.epoll() as poll:
        for sock in clients:
            poll.register(sock.fileno(), select.EPOLLIN)
        by_fd = {sock.fileno(): sock for sock in clients}
        tails = dict.fromkeys(by_fd, b"")
        for k in range(EVENTS):
            template.workers[0].instance = markers[k].decode()
            body = encode(template)
            request = (b"POST /v1/hive-heartbeat HTTP/1.1\r\nHost: q\r\ncontent-type: "
                       b"application/json\r\ncontent-length: %d\r\n\r\n" % len(body)) + body
            time.sleep(GAP_S)
            waiting = set(by_fd)
            posted = time.perf_counter()
            poster.sendall(request)
            deadline = posted + 10
            while waiting:
                assert time.perf_counter() < deadline, f"{len(waiting)} clients never got it"
                for fd, _ in poll.poll(1.0):
                    try:
                        chunk = by_fd[fd].recv(RECV_SIZE)
                    except BlockingIOError:
                        continue
                    now = time.perf_counter()
                    window = tails[fd] + chunk  # a marker may straddle two reads
                    tails[fd] = window[-16:]
                    if fd in waiting and markers[k] in window:
                        latencies.append(now - posted)
                        waiting.discard(fd)
            answer = poster.recv(RECV_SIZE)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    for sock in [*clients, poster]:
        sock.close()
    return latencies


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("workers", [100, 10], ids=lambda n: f"{n}-workers")
def test_sse_fan_out(benchmark, tmp_path, workers, side):
    source = Path(BEFORE) if side == "before" else None
    samples: list[float] = []
    with queen_process(tmp_path, "stream: {client_buffer: 1024, max_clients: 200}\n",
                       source) as (process, url):

        def one_round() -> None:
            samples.extend(fan_out(url, workers))

        ran, waited = schedstat(process.pid)
        benchmark.pedantic(one_round, rounds=3, iterations=1)
        ran, waited = (now - then for now, then in zip(schedstat(process.pid), (ran, waited),
                                                        strict=True))
    samples.sort()
    p50 = samples[len(samples) // 2] * 1e3
    p99 = samples[int(len(samples) * 0.99)] * 1e3
    FIGURES[f"SSE fan-out, {CLIENTS} clients, {workers}-worker heartbeats ({side})"] = (
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {samples[-1] * 1e3:.2f} ms "
        f"({len(samples)} receipts); the queen ran {ran * 1e3:.0f} ms and waited "
        f"{waited * 1e3:.0f} ms on a run queue for its core")
    benchmark.extra_info.update(p50_ms=p50, p99_ms=p99)
    assert len(samples) == 3 * EVENTS * CLIENTS
