"""A worker's endpoint, from its spawn spec to the queen: ``{port}`` made concrete with the port
its argv gets, kept when a restarted hive re-adopts it, carried by its records to the queen's
``/v1/workers`` and handed out by ``/v1/pick``. Real hive, real workers (the demo's simulated
vLLM), real queen on 127.0.0.1."""

from __future__ import annotations

import sys

import httpx
import pytest
import trio

from rbee._errors import ConfigError
from rbee.config import HiveConfig, WorkerSpec, parse_config
from rbee.hive.agent import HiveAgent
from rbee.hive.launch import adopted_urls, launch_of

from .hivekit import hive_config, start_hive
from .queenkit import start_queen, url_of

ENGINE_ARGV = ["{python}", "-m", "rbee.demo.worker", "--model", "llama-3-8b", "--load", "0.05",
               "--metrics-port", "{port}"]


def engine_spec(instance: str, **fields) -> dict[str, object]:
    return {"group": "llm", "instance": instance, "argv": ENGINE_ARGV,
            "metrics_url": "http://127.0.0.1:{port}/metrics",
            "endpoint": "http://127.0.0.1:{port}/v1", **fields}


def fast_hive(tag: str, workers: list[dict[str, object]], **settings) -> HiveConfig:
    return hive_config(tag, workers=workers, heartbeat={"interval_s": 0.2},
                       collect={"gpu": "none", "interval_s": 0.2, "rate_window_s": 0.2},
                       **settings)


def test_port_is_the_same_in_argv_metrics_url_and_endpoint():
    launch = launch_of(WorkerSpec(**engine_spec("a")), None)
    port = launch.argv[-1]
    assert port.isdigit() and launch.argv[0] == sys.executable
    assert launch.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert launch.endpoint == f"http://127.0.0.1:{port}/v1"
    fixed = launch_of(WorkerSpec(group="g", instance="i", argv=["x"],
                                 endpoint="https://10.0.0.7:8443"), None)
    assert fixed.endpoint == "https://10.0.0.7:8443" and fixed.argv == ["x"]


def test_a_readopted_workers_port_is_read_back_from_its_command_line():
    spec = WorkerSpec(**engine_spec("a"))
    running = [sys.executable, "-m", "rbee.demo.worker", "--model", "llama-3-8b", "--load",
               "0.05", "--metrics-port", "40123"]
    assert adopted_urls(spec, running) == ("http://127.0.0.1:40123/metrics",
                                           "http://127.0.0.1:40123/v1")
    assert adopted_urls(spec, running[:-1]) == (None, None)  # not the spec's command line
    assert adopted_urls(spec, [*running[:-1], "x40123"]) == (None, None)
    two_ports = WorkerSpec(group="g", instance="i", argv=["srv", "--port={port}", "{port}"],
                           endpoint="http://h:{port}")
    assert adopted_urls(two_ports, ["srv", "--port=81", "81"]) == (None, "http://h:81")
    assert adopted_urls(two_ports, ["srv", "--port=81", "82"]) == (None, None)
    fixed = WorkerSpec(group="g", instance="i", argv=["srv"], endpoint="http://h:9")
    assert adopted_urls(fixed, ["srv", "--other"]) == (None, "http://h:9")


@pytest.mark.parametrize("endpoint", ["ftp://h:1", "127.0.0.1:8000", "http:///v1", "http://"])
def test_an_endpoint_that_is_no_http_url_is_refused(endpoint):
    with pytest.raises(ConfigError, match=r"workers\[0\]\.endpoint"):
        parse_config({"workers": [{"group": "g", "instance": "i", "argv": ["x"],
                                   "endpoint": endpoint}]}, HiveConfig)


async def until_listed(client: httpx.AsyncClient, count: int) -> dict[str, dict]:
    """The queen's workers by instance, once ``count`` of them run with an engine state."""
    with trio.fail_after(30):
        while True:
            listed = {w["worker"]["instance"]: w["worker"]
                      for w in (await client.get("/v1/workers")).json()}
            if sum(1 for w in listed.values()
                   if w.get("state", "running") == "running" and "engine" in w) >= count:
                return listed
            await trio.sleep(0.05)


async def test_endpoint_from_a_hive_spawn_to_workers_and_pick(nursery):
    queen = await start_queen(nursery, pick={"stale_after_ms": 3_600_000})
    agent, _ = await start_hive(nursery, fast_hive("endpoint", [engine_spec("llama-0")]),
                                url_of(queen))
    await agent.spawn(WorkerSpec(**engine_spec("llama-1")))  # as POST /v1/workers does
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5.0) as client:
        listed = await until_listed(client, 2)
        for instance in ("llama-0", "llama-1"):
            port = agent.monitor.get("llm", instance).argv[-1]
            assert listed[instance]["endpoint"] == f"http://127.0.0.1:{port}/v1"
        served = await client.get(listed["llama-0"]["endpoint"].removesuffix("/v1") + "/metrics")
        assert served.status_code == 200 and "vllm:num_requests_running" in served.text
        answer = (await client.get("/v1/pick", params={"model": "llama-3-8b", "n": 2})).json()
    assert sorted(w["endpoint"] for w in answer["picked"]) == sorted(
        listed[i]["endpoint"] for i in ("llama-0", "llama-1"))


async def settled_endpoint(agent: HiveAgent, instance: str) -> str:
    """The worker's endpoint once its process serves on the port it was given, and the hive's
    records say so. Its port is free when the hive picks it, but a process of a test beside
    this one can take it first: the worker then dies at start and the hive restarts it on
    another (seen in CI runs: a new process 30 ms after the first)."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        with trio.fail_after(30):
            while True:
                worker = agent.monitor.get("llm", instance)
                port = worker.argv[-1]
                try:
                    serving = (await client.get(f"http://127.0.0.1:{port}/metrics")).is_success
                except httpx.HTTPError:
                    serving = False
                endpoint = next((w.endpoint for w in agent.latest.workers
                                 if w.instance == instance), None)
                if (serving and agent.monitor.get("llm", instance) is worker
                        and endpoint == f"http://127.0.0.1:{port}/v1"):
                    return endpoint
                await trio.sleep(0.05)


async def test_a_readopted_worker_keeps_its_endpoint(nursery):
    specs = [engine_spec("llama-0")]
    async with trio.open_nursery() as first_life:
        first, _ = await start_hive(first_life, fast_hive(
            "readopt-endpoint", specs, stop_workers_on_exit=False))
        before = await settled_endpoint(first, "llama-0")
        # the worker this hive holds as it leaves (no checkpoint between)
        worker = first.monitor.get("llm", "llama-0")
        first_life.cancel_scope.cancel()
    assert before == f"http://127.0.0.1:{worker.argv[-1]}/v1"
    second = HiveAgent(fast_hive("readopt-endpoint", specs))
    await nursery.start(second.run)
    adopted = second.monitor.get("llm", "llama-0")
    assert adopted.pid == worker.pid and adopted.process is None  # the same process, adopted
    assert next(w for w in second.latest.workers if w.instance == "llama-0").endpoint == before
