"""Engine scraping: 100 workers' real HTTP endpoints on localhost in one refresh, as the hive does
it (one pooled httpx client, all at once, bodies parsed in one worker thread), against the obvious
alternative of scraping them one after another; and the parse alone, ours against handing the
whole text to prometheus-client and against a hand-written parser. Target: a 100-worker refresh
in <= 20 ms wall; the hive's CPU per refresh is printed beside it.

The endpoints are served by a separate process (asyncio, keep-alive HTTP/1.1), so that the hive's
CPU is measured alone. Each serves vLLM 0.10's exposition (tests/engine_fixtures), a different
version on every request: counters, gauges and the time-to-first-token buckets move as they do
under load, so the hive's cache of unchanged lines gets no more help than on a real fleet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from rbee.collectors.engine.engines import identify, parse_exposition

from rbee.config import CollectorSettings, EngineSettings
from rbee.hive.collection import TelemetryCollector
from rbee.hive.origins import OriginPools
from rbee.plugin.manager import build_plugin_manager
from tests.engineservers import bump, fixture, observe

from .conftest import FIGURES, MEDIANS, record

VERSIONS = 8
SERVER = r'''
import asyncio, json, sys
versions = [open(path, "rb").read() for path in sys.argv[2:]]
responses = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(body), body) for body in versions]

async def serve(reader, writer):
    turn = 0
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if not request:
                return
            writer.write(responses[turn % len(responses)])
            turn += 1
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    servers = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(int(sys.argv[1]))]
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
'''


def loaded_versions() -> list[str]:
    """vLLM's exposition after 0..7 seconds of load: every figure we read moves."""
    text = fixture("vllm-0.10.0.prom")
    versions = []
    for second in range(VERSIONS):
        later = bump(bump(text, "vllm:prompt_tokens_total", 2000.0 * second),
                     "vllm:generation_tokens_total", 900.0 * second)
        later = bump(bump(later, "vllm:num_requests_waiting", second % 3), "vllm:num_requests_running",
                     second % 2)
        later = bump(later, "vllm:kv_cache_usage_perc", -0.01 * second)
        versions.append(observe(later, "vllm:time_to_first_token_seconds", 0.3, 3 * second))
    return versions


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engines")
    paths = []
    for index, text in enumerate(loaded_versions()):
        paths.append(directory / f"v{index}.prom")
        paths[-1].write_text(text)
    server = subprocess.Popen([sys.executable, "-c", SERVER, "100", *map(str, paths)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(server.stdout.readline())
        yield [f"http://127.0.0.1:{port}/metrics" for port in ports]
    finally:
        server.stdin.close()
        server.wait(timeout=10)


class HiveLoop:
    """A trio loop in a thread with one pooled client, as the hive's refresh task has: each
    ``refresh()`` from the benchmark thread is one refresh of every worker."""

    def __init__(self, collector: TelemetryCollector, concurrency: int) -> None:
        self.collector = collector
        self.concurrency = concurrency
        self.ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stop = trio.Event()
        async with httpx.AsyncClient(transport=OriginPools(), trust_env=False) as self.http:
            self.ready.set()
            await self.stop.wait()

    def refresh(self) -> None:
        trio.from_thread.run(self.collector.refresh_workers, self.http, 5.0,
                             trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(10)


@pytest.fixture(scope="module")
def hundred(endpoints):
    """100 real sleeping workers in cgroups, each pointed at one endpoint."""
    import os

    from rbee.hive.cgroups import select_backend
    from rbee.hive.processes import ProcessMonitor
    backend = select_backend("auto", f"rbee-bench-engine-{os.getpid()}")
    monitor = ProcessMonitor(backend)
    try:
        for index, url in enumerate(endpoints):
            monitor.spawn("bench", f"e{index:03}", ["sleep", "600"], metrics_url=url)
        yield monitor
    finally:
        monitor.stop_all(grace=1.0)
        backend.remove_root()


def test_httpx_floor_100_gets(benchmark, endpoints):
    """What httpx itself costs: 100 bare GETs through the same client, nothing parsed. The part
    of a refresh above this is rbee's own."""
    async def main(results: dict) -> None:
        async with httpx.AsyncClient(transport=OriginPools(), trust_env=False) as http:
            async def get_all() -> None:
                async with trio.open_nursery() as nursery:
                    for url in endpoints:
                        nursery.start_soon(http.get, url)
            for _ in range(VERSIONS):
                await get_all()
            cpu_started, rounds = time.process_time(), 40
            for _ in range(rounds):
                await get_all()
            results["cpu_ms"] = (time.process_time() - cpu_started) / rounds * 1000
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()

            def measure() -> None:
                benchmark.pedantic(lambda: trio.from_thread.run(get_all, trio_token=token),
                                   rounds=30, iterations=1)
                trio.from_thread.run_sync(done.set, trio_token=token)

            threading.Thread(target=measure, daemon=True).start()
            await done.wait()

    results: dict = {}
    trio.run(main, results)
    record(benchmark, "httpx floor[100] bare GETs")
    FIGURES["httpx floor[100] bare GETs: CPU per round"] = f"{results['cpu_ms']:.1f} ms"


@pytest.mark.parametrize("mode", ["concurrent", "sequential"])
def test_refresh_100_engines(benchmark, hundred, mode):
    concurrency = 64 if mode == "concurrent" else 1
    settings = CollectorSettings(gpu="none", engine=EngineSettings(max_concurrency=concurrency))
    collector = TelemetryCollector(hundred, build_plugin_manager(), settings)
    loop = HiveLoop(collector, concurrency)
    try:
        for _ in range(VERSIONS):  # connections open, every worker's line cache warm
            loop.refresh()
        cpu_started, wall_started, rounds = time.process_time(), time.perf_counter(), 40
        for _ in range(rounds):
            loop.refresh()
        cpu_ms = (time.process_time() - cpu_started) / rounds * 1000
        wall_ms = (time.perf_counter() - wall_started) / rounds * 1000
        benchmark.pedantic(loop.refresh, rounds=30, iterations=1)
        records = collector.collect_all()
    finally:
        loop.close()
        collector.close()
    assert len(records) == 100 and all(r.engine is not None for r in records), [
        r.errors for r in records if r.engine is None][:3]
    assert all(r.engine.generation_tokens_s is not None for r in records)
    record(benchmark, f"engine refresh[100] {mode}")
    FIGURES[f"engine refresh[100] {mode}: hive CPU per refresh"] = (
        f"{cpu_ms:.1f} ms CPU in {wall_ms:.1f} ms wall (mean of {rounds})")
    floor = MEDIANS.get("httpx floor[100] bare GETs")
    if floor:
        FIGURES[f"engine refresh[100] {mode} / httpx floor"] = (
            f"{MEDIANS[f'engine refresh[100] {mode}'] / floor:.2f}x")
    if mode == "sequential" and "engine refresh[100] concurrent" in MEDIANS:
        FIGURES["engine refresh[100] sequential/concurrent"] = (
            f"{MEDIANS['engine refresh[100] sequential'] / MEDIANS['engine refresh[100] concurrent']:.2f}x")


def hand_parse(text: str) -> dict[str, float]:
    """The obvious hand-written alternative: split every line, sum values by name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


PARSERS = {
    "rbee (lines cached)": None,
    "rbee (no cache)": lambda text: parse_exposition(text, 0.0),
    "prometheus_client, whole text": lambda text: [
        s for f in text_string_to_metric_families(text) for s in f.samples],
    "hand-written, whole text": hand_parse,
}


@pytest.mark.parametrize("parser", list(PARSERS))
def test_parse_100_expositions(benchmark, parser):
    versions = loaded_versions()
    texts = [versions[i % VERSIONS] for i in range(100)]
    if PARSERS[parser] is None:
        caches = [{} for _ in range(100)]
        for index in range(len(texts)):  # the previous scrape of each worker
            parse_exposition(versions[(index + VERSIONS - 1) % VERSIONS], 0.0, caches[index])

        def parse_all():
            for index, text in enumerate(texts):
                parse_exposition(text, 0.0, caches[index])
                parse_exposition(versions[(index + VERSIONS - 1) % VERSIONS], 0.0, caches[index])
        benchmark(parse_all)
        MEDIANS[f"parse[100] {parser}"] = benchmark.stats.stats.median / 2  # two parses a round
    else:
        function = PARSERS[parser]
        benchmark(lambda: [function(text) for text in texts])
        record(benchmark, f"parse[100] {parser}")
    ours = MEDIANS.get("parse[100] rbee (lines cached)")
    if ours and parser != "rbee (lines cached)":
        FIGURES[f"parse[100] {parser} / rbee (lines cached)"] = (
            f"{MEDIANS[f'parse[100] {parser}'] / ours:.2f}x")
    assert identify(texts[0]).engine == "vllm"
