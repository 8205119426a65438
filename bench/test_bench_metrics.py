"""Prometheus exposition and history at fleet scale.

- Scrape of 1,000 hives x 10 workers (8 GPUs each), target <= 200 ms; against the obvious
  alternative, a prometheus-client Gauge child per series updated on every heartbeat (its scrape,
  and what it adds to every heartbeat, which ours does not).
- A real ``rbee-queen`` holding that fleet: heartbeat latency with and without a scraper looping
  on /metrics beside it (the exposition is built in a worker thread).
- History: memory of 1,000 workers' series (target <= 200 bytes per series-minute at 1 s) and the
  cost of recording the fleet once a second.
"""

from __future__ import annotations

import statistics
import threading
import time
import tracemalloc

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from rbee.contract import encode
from rbee.exposition import WORKER_GAUGES, FleetCollector
from rbee.http.transport import ConnectionTable
from rbee.queen.history import FleetHistory
from rbee.queen.metrics import QueenMetrics
from rbee.queen.registry import HiveRegistry
from rbee.scrape import render
from tests.builders import fleet_heartbeat

from .conftest import FIGURES, MEDIANS, record
from .test_bench_queen import queen  # noqa: F401 (the fixture: a real rbee-queen, pinned)

HIVES, WORKERS = 1000, 10


@pytest.fixture(scope="module")
def fleet_registry() -> HiveRegistry:
    registry = HiveRegistry()
    for index in range(HIVES):
        registry.update_hive(fleet_heartbeat(f"hive-{index:04}", WORKERS))
    return registry


def test_scrape_fleet(benchmark, fleet_registry):
    metrics = QueenMetrics(fleet_registry, lambda: 0, lambda: 0, ConnectionTable(100))
    body, _ = benchmark(render, metrics.registry, None, fleet_registry.records)
    lines = body.count(b"\n")
    record(benchmark, "scrape 1000x10 (rbee's writer)")
    FIGURES["scrape 1000 hives x 10 workers"] = (
        f"{benchmark.stats.stats.median * 1e3:.0f} ms, {len(body) / 2**20:.1f} MiB of text, "
        f"{lines:,} lines")
    assert benchmark.stats.stats.median <= 0.2


def test_scrape_fleet_past_max_workers(benchmark, fleet_registry):
    """The same fleet past ``metrics.max_workers``: the hives' families and the queen's alone."""
    metrics = QueenMetrics(fleet_registry, lambda: 0, lambda: 0, ConnectionTable(100),
                           max_workers=HIVES * WORKERS - 1)
    body, _ = benchmark(render, metrics.registry, None, fleet_registry.records, metrics.detail)
    assert b"rbee_worker_" not in body and b"rbee_queen_metrics_workers_omitted 10000.0" in body
    record(benchmark, "scrape 1000x10 past metrics.max_workers")
    every, lines = MEDIANS.get("scrape 1000x10 (rbee's writer)"), body.count(b"\n")
    FIGURES["scrape 1000 hives x 10 workers past metrics.max_workers"] = (
        f"{benchmark.stats.stats.median * 1e3:.1f} ms, {lines:,} lines"
        + (f", {every / benchmark.stats.stats.median:.0f}x less than every worker's" if every
           else ""))


def test_scrape_fleet_prometheus_client_encoder(benchmark, fleet_registry):
    """The same samples through prometheus-client's encoder (``FleetCollector``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet_registry.records))
    benchmark.pedantic(generate_latest, (registry,), rounds=3, iterations=1)
    record(benchmark, "scrape 1000x10 (prometheus-client encoder)")
    ours = MEDIANS.get("scrape 1000x10 (rbee's writer)")
    if ours:
        FIGURES["prometheus-client's encoder / rbee's writer"] = (
            f"{benchmark.stats.stats.median / ours:.1f}x")


def test_scrape_fleet_gauge_objects(benchmark, fleet_registry):
    """The alternative: a labelled Gauge per figure, set on every heartbeat."""
    registry = CollectorRegistry()
    gauges = [(Gauge(name, text, ["hive", "group", "instance", "model"], registry=registry), value)
              for name, text, value in WORKER_GAUGES]
    heartbeats = [fleet_heartbeat(f"hive-{index:04}", WORKERS) for index in range(HIVES)]

    def ingest(beat) -> None:
        for worker in beat.workers:
            labels = (beat.hive.id, worker.group, worker.instance, worker.model or "")
            for gauge, value_of in gauges:
                value = value_of(worker)
                if value is not None:
                    gauge.labels(*labels).set(value)

    for beat in heartbeats:
        ingest(beat)
    started = time.perf_counter()
    for beat in heartbeats[:200]:
        ingest(beat)
    per_heartbeat = (time.perf_counter() - started) / 200
    benchmark.pedantic(generate_latest, (registry,), rounds=3, iterations=1)
    record(benchmark, "scrape 1000x10 (gauge objects)")
    ours = benchmark.stats.stats.median
    FIGURES["gauge objects instead"] = (
        f"scrape {ours * 1e3:.0f} ms (workers only), plus {per_heartbeat * 1e6:.0f} us added "
        f"to every 10-worker heartbeat; the collector adds nothing to ingestion")


async def _latencies(url: str, bodies: list[bytes], scrape: bool) -> tuple[list[float], list[float]]:
    latencies, scrapes = [], []
    stop = threading.Event()

    def scraper() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/metrics").status_code == 200
                scrapes.append(time.perf_counter() - started)

    thread = threading.Thread(target=scraper) if scrape else None
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        if thread:
            thread.start()
        for body in bodies:
            started = time.perf_counter()
            assert (await client.post("/v1/hive-heartbeat", content=body)).status_code == 200
            latencies.append(time.perf_counter() - started)
            await trio.sleep(0.005)
    stop.set()
    if thread:
        thread.join()
    return latencies, scrapes


def test_scrape_beside_ingestion(benchmark, queen):  # noqa: F811
    _, url = queen
    bodies = [encode(fleet_heartbeat(f"hive-{index:04}", WORKERS)) for index in range(HIVES)]

    async def load() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for body in bodies:
                assert (await client.post("/v1/hive-heartbeat", content=body)).status_code == 200

    trio.run(load)
    quiet, _ = trio.run(_latencies, url, bodies[:300], False)
    figures = {}

    def beside_scrapes() -> None:
        figures["busy"], figures["scrapes"] = trio.run(_latencies, url, bodies[:300], True)

    benchmark.pedantic(beside_scrapes, rounds=1, iterations=1)
    busy, scrapes = figures["busy"], figures["scrapes"]

    def summary(values: list[float]) -> str:
        values = sorted(values)
        return (f"p50 {statistics.median(values) * 1e3:.1f} ms, "
                f"p99 {values[int(len(values) * 0.99)] * 1e3:.1f} ms, max {values[-1] * 1e3:.1f} ms")

    FIGURES["heartbeat latency, 1000-hive queen, no scrape"] = summary(quiet)
    FIGURES["heartbeat latency, scraped in a loop beside"] = (
        f"{summary(busy)}; {len(scrapes)} scrapes, median {statistics.median(scrapes) * 1e3:.0f} ms")
    assert max(busy) - max(quiet) <= 0.2


def test_history_memory_and_recording(benchmark):
    hives = [fleet_heartbeat(f"hive-{index:03}", WORKERS) for index in range(100)]  # 1,000 workers
    from rbee.contract import HiveRecord

    records = [HiveRecord(info=b.hive, workers=b.workers, gpus=b.capabilities) for b in hives]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    history = FleetHistory()
    history.record(records, 1_800_000_000.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    series = len(history)
    now = [1_800_000_001.0]

    def one_second() -> None:
        history.record(records, now[0])
        now[0] += history.settings.fine_step_s  # one step each: a hive is read once a step

    benchmark(one_second)
    record(benchmark, "history: record 1000 workers + 800 GPUs")
    per_series = used / series
    FIGURES["history, 1000 workers + 800 GPUs"] = (
        f"{series} series at the defaults, {used / 2**20:.1f} MiB ({per_series:,.0f} B a "
        f"series, tiers and overhead); recording the fleet once: "
        f"{benchmark.stats.stats.median * 1e3:.1f} ms")
    assert per_series / 15 <= 500
