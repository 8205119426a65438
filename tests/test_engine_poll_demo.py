"""The demo's simulated vLLM as a client and the hive see it: a real ``rbee.demo.worker``
process answering completions (streamed and not), vLLM's ``/load`` and ``/metrics``, its queue
moving with the requests sent to it; and a real hive polling it fast."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from functools import partial

import httpx
import trio

from rbee.hive.agent import HiveAgent, free_port

from .daemons import end_process
from .hivekit import hive_config

MODEL = "demo-8b"


def worker_argv(port: int | str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "rbee.demo.worker", "--model", MODEL, "--load", "0.02",
            "--arrival-rate", "0", "--metrics-port", str(port), *flags]


@contextmanager
def demo_engine(*flags: str):
    port = free_port()
    process = subprocess.Popen(worker_argv(port, *flags))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        end_process(process)


async def ready(client: httpx.AsyncClient, url: str) -> None:
    with trio.fail_after(20):
        while True:
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


def send_long_requests(nursery: trio.Nursery, client: httpx.AsyncClient, url: str,
                       count: int) -> None:
    """``count`` completions that run for a minute, until the nursery is cancelled."""
    for _ in range(count):
        nursery.start_soon(partial(client.post, f"{url}/v1/completions", json={
            "model": MODEL, "prompt": "x", "max_tokens": 4000}))


def figures(metrics: str) -> tuple[float, float]:
    values = {}
    for line in metrics.splitlines():
        for name in ("running", "waiting"):
            if line.startswith(f"vllm:num_requests_{name}{{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["running"], values["waiting"]


async def test_completions_join_the_engines_queue_and_stream_at_its_pace():
    with demo_engine("--enable-server-load-tracking") as url:
        async with httpx.AsyncClient(timeout=30) as client:
            await ready(client, url)
            started = trio.current_time()
            answer = await client.post(f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "hello", "max_tokens": 30})
            took = trio.current_time() - started
            assert answer.status_code == 200
            assert len(answer.json()["choices"][0]["text"].split()) == 30
            assert 0.3 < took < 5.0  # 60 tokens a second for one request, not all at once

            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4, "stream": True}
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as stream:
                events = [line[6:] async for line in stream.aiter_lines()
                          if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert [json.loads(e)["object"] for e in events[:-1]] == ["chat.completion.chunk"] * 4

            for bad, status in (({"model": "other", "prompt": "x"}, 404),
                                ({"model": MODEL, "prompt": 7}, 400),
                                ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400)):
                refused = await client.post(f"{url}/v1/completions", json=bad)
                assert refused.status_code == status, bad
                assert refused.json()["error"]["message"]

            async with trio.open_nursery() as nursery:
                send_long_requests(nursery, client, url, 10)
                with trio.fail_after(10):
                    while (await client.get(f"{url}/load")).json()["server_load"] < 10:
                        await trio.sleep(0.05)
                    while figures((await client.get(f"{url}/metrics")).text) != (8.0, 2.0):
                        await trio.sleep(0.05)  # 8 slots run, 2 wait for one
                nursery.cancel_scope.cancel()  # the clients go: their requests are aborted
            with trio.fail_after(10):
                while (await client.get(f"{url}/load")).json()["server_load"] != 0:
                    await trio.sleep(0.05)


async def test_without_the_flag_load_says_zero_as_vllm_does():
    with demo_engine() as url:
        async with httpx.AsyncClient(timeout=30) as client:
            await ready(client, url)
            async with trio.open_nursery() as nursery:
                send_long_requests(nursery, client, url, 1)
                with trio.fail_after(10):
                    while figures((await client.get(f"{url}/metrics")).text)[0] != 1.0:
                        await trio.sleep(0.05)
                assert (await client.get(f"{url}/load")).json() == {"server_load": 0}
                nursery.cancel_scope.cancel()


async def test_the_hive_sees_the_demo_queue_move_by_its_fast_poll():
    agent = HiveAgent(hive_config(
        "engine-poll-demo", heartbeat={"interval_s": 30.0},
        collect={"interval_s": 0.5, "engine": {"poll_interval_s": 0.02}},
        workers=[{"group": "llm", "instance": "demo",
                  "argv": worker_argv("{port}", "--enable-server-load-tracking"),
                  "metrics_url": "http://127.0.0.1:{port}/metrics"}]))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(20):  # the first full reading names the engine
            while not agent.latest.workers or agent.latest.workers[0].engine is None:
                await agent.wait_changed()
        url = agent.monitor.workers()[0].metrics_url.removesuffix("/metrics")
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as requests:
            send_long_requests(requests, client, url, 3)
            with trio.fail_after(10):
                while True:
                    engine = (await agent.wait_changed()).workers[0].engine
                    if engine and engine.requests_running + engine.requests_waiting == 3:
                        break
            assert engine.sampled_at is not None
            requests.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
