"""The fast engine poll (issue 25), one run on this machine:

1. Cost of one GET on a kept-alive connection: the hive's ``EngineLink`` (its own HTTP/1.1
   reading over a trio stream) against h11 over a trio stream and an ``httpx.AsyncClient``, on
   the same engine endpoint, client CPU per GET.
2. Hive CPU for 8 engines polled at 20 Hz (target <= 5 % of a core): a real hive (its 1 s
   collection included) polling vLLM's ``/load``, polling ``/metrics`` (scheduling families only),
   and not polling fast at all; against an EPP-style poller (one httpx client polling the same
   8 engines' ``/metrics`` every 50 ms and parsing every family, as llm-d's endpoint picker does).
   Same freshness (50 ms), so CPU per freshness is the ratio of the CPU figures.
3. The engine's side: CPU the demo's simulated vLLM (prometheus-client, http.server) spends per
   ``GET /metrics`` against per ``GET /load``.
4. Engine change -> queen (target p99 <= 100 ms) with 8 engines per hive and with 100: the time
   from an engine's ``/load`` changing to the queen's SSE stream carrying the new figure.

The engines are served by a separate process (asyncio, keep-alive HTTP/1.1), so the poller's CPU
is measured alone. Each serves vLLM 0.10's exposition (tests/engine_fixtures) on ``/metrics`` and
``{"server_load": N}`` on ``/load``; the benchmark sets N through the process's stdin.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from rbee.collectors.engine.link import EngineLink

from rbee.contract import STREAM_EVENT_NAME, decode_stream_event
from rbee.hive.agent import HiveAgent, free_port
from tests.engineservers import fixture
from tests.hivekit import hive_config, start_hive
from tests.queenkit import open_stream, start_queen

from .conftest import FIGURES

SERVER = r'''
import asyncio, json, sys
metrics = open(sys.argv[2], "rb").read()
loads = {}

def answer(body, kind):
    return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (kind, len(body), body))

METRICS = answer(metrics, b"text/plain; version=0.0.4; charset=utf-8")

async def serve(reader, writer, index):
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith(b"GET /load "):
                body = json.dumps({"server_load": loads.get(index, 19)}).encode()
                writer.write(answer(body, b"application/json"))
            else:
                writer.write(METRICS)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def control():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        index, load = map(int, line.split())
        loads[index] = load

async def main():
    servers = []
    for index in range(int(sys.argv[1])):
        handler = lambda r, w, index=index: serve(r, w, index)
        servers.append(await asyncio.start_server(handler, "127.0.0.1", 0))
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await control()

asyncio.run(main())
'''
FLAG = "--enable-server-load-tracking"
MEASURE_S = 5.0


class Engines:
    """``count`` engine endpoints in one separate process; ``set_load`` changes one's /load."""

    def __init__(self, count: int, directory) -> None:
        path = directory / "vllm.prom"
        path.write_text(fixture("vllm-0.10.0.prom"))
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(count), str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.urls = [f"http://127.0.0.1:{port}/metrics"
                     for port in json.loads(self.process.stdout.readline())]

    def set_load(self, index: int, load: int) -> None:
        self.process.stdin.write(f"{index} {load}\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    engines = Engines(8, tmp_path_factory.mktemp("engines8"))
    yield engines
    engines.close()


def cpu_pct(started_cpu: float, started_wall: float) -> float:
    return 100 * (time.process_time() - started_cpu) / (time.perf_counter() - started_wall)


# -- 1. one GET ------------------------------------------------------------------------------

def test_cost_per_get_link_vs_httpx(eight):
    url = eight.urls[0]
    count = 2000

    async def link_gets() -> float:
        link = EngineLink(url, 2.0, 2**20)
        await link.get("/load")
        started = time.process_time()
        for _ in range(count):
            await link.get("/load")
        spent = time.process_time() - started
        await link.aclose()
        return spent / count

    async def httpx_gets() -> float:
        async with httpx.AsyncClient(trust_env=False) as client:
            load = url.replace("/metrics", "/load")
            await client.get(load)
            started = time.process_time()
            for _ in range(count):
                (await client.get(load)).raise_for_status()
            spent = time.process_time() - started
        return spent / count

    async def h11_gets() -> float:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/load", headers=[("host", "127.0.0.1")])
        started = time.process_time()
        for _ in range(count):
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
            while not isinstance(event := connection.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
            connection.start_next_cycle()
        spent = time.process_time() - started
        await stream.aclose()
        return spent / count

    link_s, h11_s, httpx_s = trio.run(link_gets), trio.run(h11_gets), trio.run(httpx_gets)
    FIGURES["engine poll: client CPU per GET /load, EngineLink"] = f"{link_s * 1e6:.0f} µs"
    FIGURES["engine poll: client CPU per GET /load, h11 over a trio stream"] = \
        f"{h11_s * 1e6:.0f} µs ({h11_s / link_s:.1f}x the link)"
    FIGURES["engine poll: client CPU per GET /load, httpx.AsyncClient"] = \
        f"{httpx_s * 1e6:.0f} µs ({httpx_s / link_s:.1f}x the link)"
    assert link_s < h11_s < httpx_s


# -- 2. hive CPU at 20 Hz, and an EPP-style poller ---------------------------------------------

def hive_cpu(engines: Engines, tag: str, flag: bool, poll_interval_s: float) -> tuple[float, int]:
    """CPU % of one core of a real hive with 8 workers on the engines, over MEASURE_S."""
    argv = ["sh", "-c", "exec sleep 600", *([FLAG] if flag else [])]
    config = hive_config(tag, collect={"engine": {"poll_interval_s": poll_interval_s}},
                         workers=[{"group": "llm", "instance": f"e{index}", "argv": argv,
                                   "metrics_url": url} for index, url in enumerate(engines.urls)])

    async def main() -> tuple[float, int]:
        agent = HiveAgent(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            with trio.fail_after(10):
                while sum(w.engine is not None for w in agent.latest.workers) < 8:
                    await agent.wait_changed()
            await trio.sleep(0.5)
            poller = agent.loops.engine_poll
            polls = poller.polls
            started_cpu, started_wall = time.process_time(), time.perf_counter()
            await trio.sleep(MEASURE_S)
            result = cpu_pct(started_cpu, started_wall), poller.polls - polls
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def epp_cpu(engines: Engines) -> tuple[float, int]:
    """An EPP-style poller: every 50 ms, every engine's /metrics, every family parsed."""
    async def main() -> tuple[float, int]:
        polls = 0
        async with httpx.AsyncClient(trust_env=False) as client:
            async def one(url: str) -> None:
                nonlocal polls
                while True:
                    started = trio.current_time()
                    text = (await client.get(url)).text
                    families = {f.name: f for f in text_string_to_metric_families(text)}
                    assert "vllm:num_requests_waiting" in families
                    polls += 1
                    await trio.sleep_until(started + 0.05)

            async with trio.open_nursery() as nursery:
                for url in engines.urls:
                    nursery.start_soon(one, url)
                await trio.sleep(0.5)
                before = polls
                started_cpu, started_wall = time.process_time(), time.perf_counter()
                await trio.sleep(MEASURE_S)
                result = cpu_pct(started_cpu, started_wall), polls - before
                nursery.cancel_scope.cancel()
        return result

    return trio.run(main)


def test_hive_cpu_for_8_engines_at_20hz_against_an_epp_style_poller(eight):
    load_pct, load_polls = hive_cpu(eight, "bench-poll-load", True, 0.05)
    metrics_pct, metrics_polls = hive_cpu(eight, "bench-poll-metrics", False, 0.05)
    idle_pct, _ = hive_cpu(eight, "bench-poll-off", True, 60.0)
    epp_pct, epp_polls = epp_cpu(eight)
    rate = 8 * 20 * MEASURE_S
    FIGURES["engine poll: hive CPU, 8 engines, no fast poll (1 s heartbeat only)"] = \
        f"{idle_pct:.2f} % of a core"
    FIGURES["engine poll: hive CPU, 8 engines at 20 Hz on /load"] = \
        f"{load_pct:.2f} % ({load_pct - idle_pct:+.2f} for the poll; {load_polls / rate:.0%} " \
        f"of the polls due)"
    FIGURES["engine poll: hive CPU, 8 engines at 20 Hz on /metrics (scheduling families)"] = \
        f"{metrics_pct:.2f} % ({metrics_pct - idle_pct:+.2f}; {metrics_polls / rate:.0%})"
    FIGURES["engine poll: EPP-style poller, 8 engines' /metrics at 20 Hz, fully parsed"] = \
        f"{epp_pct:.2f} % ({epp_polls / rate:.0%} of the polls due; " \
        f"{epp_pct / max(load_pct, 0.01):.1f}x the hive on /load)"
    assert load_pct <= 5.0, f"hive at {load_pct:.2f} % of a core"


# -- 3. the engine's side ----------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_engine_side_cost_of_metrics_against_load():
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "rbee.demo.worker", "--model", "m",
                               "--load", "0", "--arrival-rate", "0", "--metrics-port", str(port),
                               FLAG])
    count = 3000
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(trust_env=False) as client:
            for _ in range(100):
                try:
                    client.get(f"{base}/load")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            costs = {}
            lines = client.get(f"{base}/metrics").text.count("\n")
            for path in ("/metrics", "/load", "/metrics", "/load"):
                idle_started, idle_cpu = time.perf_counter(), proc_cpu_s(worker.pid)
                time.sleep(2.0)
                idle_rate = (proc_cpu_s(worker.pid) - idle_cpu) / (time.perf_counter()
                                                                    - idle_started)
                started, cpu = time.perf_counter(), proc_cpu_s(worker.pid)
                for _ in range(count):
                    client.get(base + path).raise_for_status()
                spent = proc_cpu_s(worker.pid) - cpu - idle_rate * (time.perf_counter() - started)
                costs[path] = spent / count
    finally:
        worker.terminate()
        worker.wait(timeout=10)
    FIGURES["engine side: demo vLLM CPU per GET /metrics"] = \
        f"{costs['/metrics'] * 1e6:.0f} µs ({lines} lines; a real vLLM prints ~440)"
    FIGURES["engine side: demo vLLM CPU per GET /load"] = \
        f"{costs['/load'] * 1e6:.0f} µs ({costs['/metrics'] / max(costs['/load'], 1e-9):.1f}x " \
        "cheaper)"
    assert costs["/load"] < costs["/metrics"]


# -- 4. engine change -> queen ---------------------------------------------------------------

@pytest.mark.parametrize(("transport", "post_min_interval_s"),
                         [("channel", 0.25), ("post", 0.25), ("post", 0.0)],
                         ids=["channel", "post-0.25s", "post-0s"])
@pytest.mark.parametrize("count", [8, 100])
def test_engine_change_to_queen_latency(count, transport, post_min_interval_s, tmp_path_factory):
    engines = Engines(count, tmp_path_factory.mktemp(f"engines{count}"))
    changes = 60
    try:
        latencies = trio.run(change_latencies, engines, count, changes, transport,
                             post_min_interval_s)
    finally:
        engines.close()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    over = "channel" if transport == "channel" else \
        f"POST, post_min_interval_s {post_min_interval_s:g}"
    FIGURES[f"engine change -> queen stream, {count} engines per hive, {over}"] = \
        f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms ({len(latencies)} changes)"


async def change_latencies(engines: Engines, count: int, changes: int, transport: str,
                           post_min_interval_s: float) -> list[float]:
    argv = ["sh", "-c", "exec sleep 600", FLAG]
    config = hive_config(f"bench-latency-{count}", heartbeat={"transport": transport},
                         collect={"engine": {"post_min_interval_s": post_min_interval_s}},
                         workers=[{"group": "llm", "instance": f"e{index:03}", "argv": argv,
                                   "metrics_url": url} for index, url in enumerate(engines.urls)])
    latencies = []
    async with trio.open_nursery() as nursery:
        queen = await start_queen(nursery)
        agent, sender = await start_hive(nursery, config, queen.urls[0])
        agent.loops.engine_poll.on_channel = lambda: sender.on_channel  # as HiveService does
        with trio.fail_after(30):
            while sum(w.engine is not None for w in agent.latest.workers) < count:
                await agent.wait_changed()
        await trio.sleep(1.0)  # every engine's fast poll running
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client, \
                open_stream(client, queen) as stream:
            for change in range(changes):
                index = change * 7 % count
                waiting = 100 + change  # 112 + change in flight: 12 run, the rest wait
                instance = f"e{index:03}"
                engines.set_load(index, 12 + waiting)
                sent = time.perf_counter()

                def seen(event, instance=instance, waiting=waiting) -> bool:
                    workers = getattr(event, "workers", ())
                    return any(w.instance == instance and w.engine is not None
                               and w.engine.requests_waiting == waiting for w in workers)

                with trio.fail_after(10):
                    while True:  # heartbeat events only (the stream also sends keep-alives)
                        sse = await stream.next_raw(timeout=10)
                        if sse.event == STREAM_EVENT_NAME and seen(decode_stream_event(sse.data)):
                            break
                latencies.append(time.perf_counter() - sent)
                await trio.sleep(0.05 + (change % 5) * 0.013)
        nursery.cancel_scope.cancel()
    return latencies
