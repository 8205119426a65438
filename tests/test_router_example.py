"""examples/router end to end: a real queen, a real hive with two demo workers (simulated vLLM
engines answering completions, no simulated traffic), and the router, all on 127.0.0.1.

The router asks the queen's ``/v1/pick`` and forwards each completion to the picked worker's
endpoint, streaming the answer back; picks count in flight on their worker, so requests sent
together spread over both workers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import trio

ROUTER = Path(__file__).resolve().parent.parent / "examples" / "router" / "router.py"
MODEL = "demo-8b"


def load_router():
    spec = importlib.util.spec_from_file_location("rbee_router_example", ROUTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_worker(instance: str) -> dict:
    return {"group": "llm", "instance": instance,
            "argv": [sys.executable, "-m", "rbee.demo.worker", "--model", MODEL, "--load", "0.02",
                     "--arrival-rate", "0", "--metrics-port", "{port}",
                     "--enable-server-load-tracking"],
            "metrics_url": "http://127.0.0.1:{port}/metrics",
            "endpoint": "http://127.0.0.1:{port}"}


async def listed(client: httpx.AsyncClient, queen_url: str, count: int) -> list[dict]:
    """The queen's workers once ``count`` of them can be picked: schedulable (running), with an
    endpoint, an engine state and the model."""
    with trio.fail_after(20):
        while True:
            workers = (await client.get(f"{queen_url}/v1/workers")).json()
            ready = [w for w in workers if w["schedulable"] and w["worker"].get("endpoint")
                     and w["worker"].get("engine") and w["worker"].get("model") == MODEL]
            if len(ready) >= count:
                return ready
            await trio.sleep(0.1)


async def sse_texts(response: httpx.Response) -> list[str]:
    texts = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            texts.append(data if data == "[DONE]" else json.loads(data)["choices"][0]["text"])
    return texts


async def test_the_router_forwards_each_request_to_a_picked_worker_and_streams_back(tmp_path):
    from .test_end_to_end import hive, queen  # the real daemons: rbee-queen, rbee-hive

    router_module = load_router()
    with queen(tmp_path) as q, hive(tmp_path, "router", q.url,
                                    [demo_worker("a"), demo_worker("b")]):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as client:
            queen_url = q.url
            router = router_module.Router(queen_url)
            url = await nursery.start(router_module.run, router, "127.0.0.1", 0)
            await routed(client, url, queen_url)
            nursery.cancel_scope.cancel()


async def routed(client: httpx.AsyncClient, url: str, queen_url: str) -> None:
    """Requests through the router at ``url`` to the queen's two demo workers."""
    workers = await listed(client, queen_url, 2)
    assert {w["worker"]["endpoint"].startswith("http://127.0.0.1:") for w in workers} \
        == {True}

    body = {"model": MODEL, "prompt": "hello", "max_tokens": 12, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-rbee-worker"] in ("e2e-router/llm/a",
                                                     "e2e-router/llm/b")
        texts = await sse_texts(response)
    assert texts[-1] == "[DONE]" and len(texts) == 13  # 12 tokens, then the end

    chat = await client.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5})
    assert chat.status_code == 200
    assert chat.json()["usage"]["completion_tokens"] == 5
    assert len(chat.json()["choices"][0]["message"]["content"].split()) == 5

    served: list[str] = []

    async def one() -> None:
        answer = await client.post(f"{url}/v1/completions", json={
            "model": MODEL, "prompt": "spread", "max_tokens": 30})
        assert answer.status_code == 200, answer.text
        served.append(answer.headers["x-rbee-worker"])

    async with trio.open_nursery() as requests:
        for _ in range(4):
            requests.start_soon(one)
    assert sorted(set(served)) == ["e2e-router/llm/a", "e2e-router/llm/b"], served

    unknown = await client.post(f"{url}/v1/completions", json={
        "model": "no-such-model", "prompt": "x"})
    assert unknown.status_code == 503 and "queen:" in unknown.json()["error"]["message"]
    no_model = await client.post(f"{url}/v1/completions", content=b"[1, 2]")
    assert no_model.status_code == 400


async def test_the_router_says_when_the_queen_cannot_be_reached():
    router_module = load_router()
    async with trio.open_nursery() as nursery:
        router = router_module.Router("http://127.0.0.1:1")
        url = await nursery.start(router_module.run, router, "127.0.0.1", 0)
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"{url}/v1/completions", json={"model": MODEL})
        assert answer.status_code == 502
        assert "queen http://127.0.0.1:1 unreachable" in answer.json()["error"]["message"]
        nursery.cancel_scope.cancel()
