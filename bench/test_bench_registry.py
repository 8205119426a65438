"""The registry under hostile load, against a real ``rbee-queen`` process pinned to CPU 0 (the
load from this process, on CPU 1).

- Read load: 5,000 hives, 4 clients looping on ``GET /v1/workers``; the heartbeat latency of a
  real hive is measured with no reader, with readers asking for the whole fleet in one answer
  (``limit=10000``) and with readers taking the default page; on this branch's queen and, in the
  same run, on the baseline's (``RBEE_BENCH_BASELINE``, a git revision, ``main`` by default,
  exported with ``git archive``; it knows no ``limit``, so every reader gets the whole fleet).
  The ratio baseline / this branch is printed.
- Fake-id burst: 20,000 ids posted once while 4 real hives report; one real hive then falls
  silent and must be removed (before, the stale fakes outnumbered the fleet and the mass-silence
  guard held off every removal for good).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from rbee.contract import encode
from tests.builders import fleet_heartbeat, heartbeat, worker

from .conftest import FIGURES
from .test_bench_queen import queen_process

FLEET = 5000
READERS = 4
WINDOW_S = 6.0
PROBE_GAP_S = 0.01


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def post_many(url: str, bodies: list[bytes], connections: int = 32) -> None:
    """Every body once, over ``connections`` concurrent clients; each must be accepted."""
    queue = iter(bodies)

    async def sender() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            for body in queue:
                response = await client.post("/v1/hive-heartbeat", content=body)
                assert response.status_code == 200, response.text

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(sender)


BASELINE = os.environ.get("RBEE_BENCH_BASELINE", "main")
REPO = Path(__file__).parents[1]


def baseline_source(directory: Path) -> Path:
    """The baseline revision's files, exported into ``directory``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE], capture_output=True,
                             timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"no git revision {BASELINE!r} to compare with (RBEE_BENCH_BASELINE): "
                    f"{archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True,
                   timeout=60)
    return directory


@pytest.fixture(scope="module", params=["baseline", "this branch"])
def fleet_queen(request, tmp_path_factory):
    """A queen holding 5,000 one-worker hives that never go away in the test's time."""
    directory = tmp_path_factory.mktemp("fleet")
    if request.param == "baseline":
        source = baseline_source(tmp_path_factory.mktemp("baseline"))
        config = "registry: {remove_after_s: 3600}\n"
    else:
        source, config = None, "registry: {remove_after_s: 3600, new_hives_burst: 10000}\n"
    with queen_process(directory, config, source) as (_, url):
        bodies = [encode(fleet_heartbeat(f"hive-{n:05}", 1)) for n in range(FLEET)]
        trio.run(post_many, url, bodies)
        yield request.param, url


async def heartbeat_latencies(url: str, reader_params: dict[str, str] | None) -> tuple[
        list[float], int]:
    """Latencies of one real hive's heartbeats over WINDOW_S while READERS clients loop on
    ``GET /v1/workers`` with ``reader_params`` (no readers for None); and the reads done."""
    body = encode(fleet_heartbeat("hive-00000", 1))
    latencies: list[float] = []
    reads = 0

    async def reader() -> None:
        nonlocal reads
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            while True:
                response = await client.get("/v1/workers", params=reader_params)
                assert response.status_code == 200
                reads += 1

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as prober, \
            trio.open_nursery() as nursery:
        if reader_params is not None:
            for _ in range(READERS):
                nursery.start_soon(reader)
            await trio.sleep(0.5)
        deadline = trio.current_time() + WINDOW_S
        while trio.current_time() < deadline:
            started = time.perf_counter()
            response = await prober.post("/v1/hive-heartbeat", content=body)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200
            await trio.sleep(PROBE_GAP_S)
        nursery.cancel_scope.cancel()
    return latencies, reads


READ_MODES = {"no readers": None, "whole fleet": {"limit": "10000"}, "default page": {}}
MEDIANS_MS: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("mode", list(READ_MODES))
def test_heartbeat_latency_under_read_load(benchmark, fleet_queen, mode):
    which, url = fleet_queen
    if which == "baseline" and mode == "default page":
        pytest.skip("the baseline has no pages: its readers all get the whole fleet")
    params = READ_MODES[mode] if which == "this branch" or mode == "no readers" else {}
    result: list[tuple[list[float], int]] = []
    benchmark.pedantic(lambda: result.append(trio.run(heartbeat_latencies, url, params)),
                       rounds=1, iterations=1)
    latencies, reads = result[0]
    median = statistics.median(latencies) * 1e3
    p99 = sorted(latencies)[int(len(latencies) * 0.99)] * 1e3
    MEDIANS_MS[which, mode] = median
    FIGURES[f"heartbeat latency, {FLEET} hives, {which} ({BASELINE if which == 'baseline' else 'HEAD'}), "
            f"{mode}"] = (
        f"median {median:.2f} ms, p99 {p99:.2f} ms ({len(latencies)} heartbeats, "
        f"{reads / WINDOW_S:.1f} reads/s)")
    before = MEDIANS_MS.get(("baseline", "whole fleet"))
    if which == "this branch" and mode != "no readers" and before:
        FIGURES[f"heartbeat latency under {READERS} readers, baseline / this branch ({mode})"] = (
            f"{before / median:.1f}x ({before:.1f} ms -> {median:.1f} ms median)")
    benchmark.extra_info.update(median_ms=median, p99_ms=p99, reads=reads)
    assert latencies


# -- a burst of fake ids ------------------------------------------------------------------

FAKES = 20_000
REAL = ("gpu-01", "gpu-02", "gpu-03", "gpu-04")


async def burst_then_silence(url: str, pid: int) -> dict[str, float]:
    figures: dict[str, float] = {"rss_before_mb": rss_mb(pid)}
    silent = trio.Event()
    bodies = {hive: encode(heartbeat(hive, [worker("w")])) for hive in REAL}

    async def real_hive(hive: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
            while not (hive == "gpu-04" and silent.is_set()):
                response = await client.post("/v1/hive-heartbeat", content=bodies[hive])
                assert response.status_code == 200
                await trio.sleep(0.5)

    async with trio.open_nursery() as nursery, \
            httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        for hive in REAL:
            nursery.start_soon(real_hive, hive)
        await trio.sleep(3)  # the real hives are established (established_after_s: 2)
        started = time.perf_counter()
        await post_many(url, [encode(heartbeat(f"fake-{n:05}")) for n in range(FAKES)])
        figures["burst_s"] = time.perf_counter() - started
        figures["rss_burst_mb"] = rss_mb(pid)
        before = time.perf_counter()
        await client.get("/v1/workers")
        figures["page_ms"] = (time.perf_counter() - before) * 1e3
        silent.set()
        silenced = time.perf_counter()
        with trio.fail_after(120):
            while True:
                hives = [h["hive"]["id"] for h in (await client.get("/v1/hives")).json()]
                if "gpu-04" not in hives:
                    figures.setdefault("removed_after_s", time.perf_counter() - silenced)
                if hives == list(REAL[:3]):
                    break
                await trio.sleep(0.25)
        figures["all_gone_s"] = time.perf_counter() - silenced
        nursery.cancel_scope.cancel()
    return figures


def test_fake_id_burst_cannot_hold_off_removal(benchmark, tmp_path):
    config = ("registry: {stale_after_s: 1.0, remove_after_s: 4.0, established_after_s: 2.0,\n"
              f"           cleanup_interval_s: 0.5, max_hives: {FAKES + 100},\n"
              f"           new_hives_burst: {FAKES + 100}}}\n")
    with queen_process(tmp_path, config) as (process, url):
        result: list[dict[str, float]] = []
        benchmark.pedantic(lambda: result.append(trio.run(burst_then_silence, url,
                                                          process.pid)),
                           rounds=1, iterations=1)
    figures = result[0]
    FIGURES[f"{FAKES:,} fake ids posted once, then a real hive silent"] = (
        f"burst {figures['burst_s']:.1f}s, RSS {figures['rss_before_mb']:.0f} -> "
        f"{figures['rss_burst_mb']:.0f} MB, GET /v1/workers (default page) "
        f"{figures['page_ms']:.1f} ms; the silent hive removed "
        f"{figures['removed_after_s']:.1f}s after its last heartbeat (remove_after_s 4), "
        f"the last fakes {figures['all_gone_s']:.1f}s after")
