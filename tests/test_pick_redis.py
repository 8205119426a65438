"""The pick with the redis store: two queens share one fleet on a real Redis, and either picks
from it, since the pick's index follows the registry that the store's mirror updates (not the
HTTP handler that took the heartbeat)."""

from __future__ import annotations

import time

import httpx
import pytest

from rbee.contract import EngineState, utc_now

from .builders import heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of
from .rediskit import running_redis, wait_for


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis-pick")) as server:
        yield server.url


def serving(instance: str, waiting: int) -> object:
    return worker(instance, model="llama", endpoint=f"http://10.2.0.{instance[1:]}:8000",
                  engine=EngineState(engine="vllm", requests_running=0,
                                     requests_waiting=waiting, sampled_at=utc_now()))


async def test_a_heartbeat_taken_by_one_queen_is_picked_by_the_other(nursery, redis_url):
    settings = {"registry": {"store": {"kind": "redis", "url": redis_url,
                                       "key_prefix": f"pick-{time.time_ns()}"}},
                "pick": {"stale_after_ms": 3_600_000}}
    a = await start_queen(nursery, **settings)
    b = await start_queen(nursery, **settings)
    async with httpx.AsyncClient(timeout=5.0) as client:
        await post_heartbeat(client, a, heartbeat("hive-x", [serving("w1", 3), serving("w2", 0)]))

        async def picked_on_b():
            response = await client.get(f"{url_of(b)}/v1/pick", params={"model": "llama"})
            return response.status_code == 200 and response.json()["picked"][0]

        first = await wait_for(picked_on_b)
        assert first["endpoint"] == "http://10.2.0.2:8000" and first["in_flight"] == 1
        removed = await client.delete(f"{url_of(a)}/v1/hives/hive-x")
        assert removed.status_code == 200, removed.text

        async def refused_on_b():
            response = await client.get(f"{url_of(b)}/v1/pick", params={"model": "llama"})
            return response.status_code == 503 and response.json()["message"]

        assert "no worker of model 'llama' can be picked" in await wait_for(refused_on_b)
