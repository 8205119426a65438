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

The engines are stand-in vLLMs in a separate process (``bench/engineserver.py``), so the poller's
CPU is measured alone. Engine change -> queen, through real processes, is
``bench/test_bench_engine_change.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from rbee.collectors.engine.link import EngineLink

from rbee.hive.agent import HiveAgent, free_port
from tests.hivekit import hive_config

from .conftest import FIGURES
from .engineserver import Engines, proc_cpu_s

FLAG = "--enable-server-load-tracking"
MEASURE_S = 5.0


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
