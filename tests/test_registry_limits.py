"""The registry's limits over HTTP, on a real queen (127.0.0.1, port 0): the cap on hives, the
admission rate of new hives, and ``GET /v1/workers`` in pages.

The fake-id burst against the mass-silence guard is in test_registry.py (2,000 ids, a manual
clock); the 20,000-id burst and the read load against ingestion are in bench/.
"""

from __future__ import annotations

import httpx
import pytest

from rbee.contract import encode

from .builders import heartbeat, worker
from .queenkit import start_queen, url_of


async def post(client: httpx.AsyncClient, hive_id: str) -> httpx.Response:
    return await client.post("/v1/hive-heartbeat", content=encode(heartbeat(hive_id)))


@pytest.fixture
async def client_of(nursery):
    async def open_client(**registry: object) -> httpx.AsyncClient:
        queen = await start_queen(nursery, registry=registry)
        client = httpx.AsyncClient(base_url=url_of(queen), timeout=5.0)
        clients.append(client)
        return client

    clients: list[httpx.AsyncClient] = []
    yield open_client
    for client in clients:
        await client.aclose()


async def test_a_full_registry_refuses_new_hives_naming_the_cap(client_of):
    client = await client_of(max_hives=2)
    assert [(await post(client, h)).status_code for h in ("a", "b")] == [200, 200]
    refused = await post(client, "c")
    assert refused.status_code == 503
    assert refused.json()["message"] == (
        "hive 'c' refused: the registry is full (registry.max_hives: 2)")
    assert (await post(client, "a")).status_code == 200  # known hives are never refused
    assert (await client.delete("/v1/hives/a")).status_code == 200
    assert (await post(client, "c")).status_code == 200
    assert [h["hive"]["id"] for h in (await client.get("/v1/hives")).json()] == ["b", "c"]


async def test_new_hives_beyond_the_rate_get_429_with_retry_after(client_of):
    client = await client_of(new_hives_per_s=0.01, new_hives_burst=3)
    assert [(await post(client, f"h{n}")).status_code for n in range(3)] == [200] * 3
    refused = await post(client, "h3")
    assert refused.status_code == 429
    assert 0 < int(refused.headers["retry-after"]) <= 100
    assert "at most 0.01/s (registry.new_hives_per_s, burst 3)" in refused.json()["message"]
    for _ in range(5):  # a known hive keeps reporting whatever the rate
        assert (await post(client, "h0")).status_code == 200
    assert len((await client.get("/v1/hives")).json()) == 3


async def test_workers_come_in_pages_with_a_cursor(client_of):
    client = await client_of(workers_limit=5, workers_max_limit=8)
    for hive in ("h2", "h0", "h1"):
        body = encode(heartbeat(hive, [worker(f"w{k}") for k in range(4)]))
        assert (await client.post("/v1/hive-heartbeat", content=body)).status_code == 200
    every = [f"h{h}/llm/w{k}" for h in range(3) for k in range(4)]

    def ids(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [f"{w['hive_id']}/{w['worker']['group']}/{w['worker']['instance']}"
                for w in response.json()]

    first = await client.get("/v1/workers")  # the default limit
    assert ids(first) == every[:5] and first.headers["x-next-after"] == "h1/llm/w0"
    assert first.links["next"]["url"].endswith("/v1/workers?after=h1%2Fllm%2Fw0")
    second = await client.get(first.links["next"]["url"])
    assert ids(second) == every[5:10]
    last = await client.get("/v1/workers", params={"after": "h2/llm/w1", "limit": 8})
    assert ids(last) == every[10:] and "x-next-after" not in last.headers
    idle = await client.get("/v1/workers", params={"idle": "true", "limit": 2,
                                                   "after": "h0/llm/w3"})
    assert ids(idle) == every[4:6] and idle.headers["x-next-after"] == "h1/llm/w1"
    assert "idle=true" in idle.links["next"]["url"]


async def test_hives_come_in_pages_too(client_of):
    client = await client_of(hives_limit=2, max_hives=3)
    for hive in ("c", "a", "b"):
        assert (await post(client, hive)).status_code == 200

    def ids(response: httpx.Response) -> list[str]:
        assert response.status_code == 200, response.text
        return [h["hive"]["id"] for h in response.json()]

    first = await client.get("/v1/hives")
    assert ids(first) == ["a", "b"] and first.headers["x-next-after"] == "b"
    rest = await client.get(first.links["next"]["url"])
    assert ids(rest) == ["c"] and "x-next-after" not in rest.headers
    assert ids(await client.get("/v1/hives", params={"limit": 3})) == ["a", "b", "c"]
    too_many = await client.get("/v1/hives", params={"limit": 4})
    assert too_many.status_code == 400
    assert "from 1 to 3 (registry.max_hives), not '4'" in too_many.json()["message"]


@pytest.mark.parametrize(("params", "expected"), [
    ({"limit": "0"}, "'limit' must be a whole number from 1 to 10000 "
                     "(registry.workers_max_limit), not '0'"),
    ({"limit": "10001"}, "not '10001'"),
    ({"limit": "ten"}, "not 'ten'"),
    ({"after": "h0/w0"}, "query parameter 'after': 'h0/w0' is not a worker id"),
    ({"cursor": "x"}, "unknown query parameter(s): cursor"),
])
async def test_bad_page_parameters_are_named(client_of, params, expected):
    client = await client_of()
    response = await client.get("/v1/workers", params=params)
    assert response.status_code == 400
    assert expected in response.json()["message"]
