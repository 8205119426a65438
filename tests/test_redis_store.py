"""Several queens, one fleet, on a real Redis (Debian's redis-server, one per test session).

The failover scenario runs real processes: two ``rbee-queen`` and one ``rbee-hive`` whose
``queen_url`` lists both; queen A is killed with SIGKILL mid-stream. The others run queens
in-process, where their registry can be read directly. Every test uses its own ``key_prefix``,
so they share the session's Redis without seeing one another.
"""

from __future__ import annotations

import itertools
import signal
import time

import httpx
import pytest
import trio
import yaml
from httpx_sse import aconnect_sse

from rbee.contract import (
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    SnapshotEvent,
    decode_stream_event,
    encode,
)
from rbee.queen.redis.keys import entry_key

from .builders import heartbeat, worker
from .daemons import BIN, Daemon
from .queenkit import STREAM_PATH, free_port, open_stream, post_heartbeat, start_queen
from .rediskit import RedisServer, running_redis, wait_for

INTERVAL = 0.4
"""The hive's heartbeat interval in the failover scenario."""
LEASE_S = 1.2
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        yield client


def store(url: str, **extra) -> dict:
    return {"kind": "redis", "url": url, "key_prefix": f"t{next(_prefixes)}-{time.time_ns()}",
            "lease_s": LEASE_S, **extra}


def registry(url: str, **extra) -> dict:
    return {"stale_after_s": 1.0, "remove_after_s": 2.0, "cleanup_interval_s": 0.1,
            "store": store(url, **extra)}


async def health(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(f"{url}/health")).json()


async def test_two_queens_share_the_fleet(nursery, client, redis_server):
    """A heartbeat posted to queen A is in queen B's registry, scheduling answers and stream;
    an operator's removal on B reaches A; the sweeper (one of them) marks a silent hive stale
    on Redis's clock and then removes it, and both queens' streams say so."""
    settings = {"registry": registry(redis_server.url), "stream": {"queen_interval_s": 0.5}}
    a = await start_queen(nursery, **settings)
    b = await start_queen(nursery, **settings)
    async with open_stream(client, b) as on_b:
        assert isinstance(await on_b.next(), SnapshotEvent)
        await post_heartbeat(client, a, heartbeat("hive-x", [worker("w1"), worker("w2")]))
        telemetry = await on_b.next("hive_telemetry")
        assert isinstance(telemetry, HiveTelemetryEvent) and telemetry.hive_id == "hive-x"
        for path in ("/v1/hives", "/v1/workers", "/v1/workers?idle=true"):
            from_a = (await client.get(f"{a.urls[0]}{path}")).json()
            from_b = (await client.get(f"{b.urls[0]}{path}")).json()
            for listing in (from_a, from_b):  # silences differ by the instant each was read
                for item in listing:
                    item.pop("silent_s", None)
            assert from_a == from_b and from_a, path
        assert b.registry.get_hive("hive-x").hive.id == "hive-x"
        assert "rbee_hive_info{hive=\"hive-x\"" in (await client.get(f"{b.urls[0]}/metrics")).text
        assert [(await health(client, q.urls[0]))["sweeping"] for q in (a, b)].count(True) == 1

        removed = (await client.delete(f"{b.urls[0]}/v1/hives/hive-x"))
        assert removed.status_code == 200, removed.text
        event = await on_b.next("hive_removed")
        assert isinstance(event, HiveRemovedEvent)
        assert sorted(event.worker_ids) == ["hive-x/llm/w1", "hive-x/llm/w2"]
        await wait_for(lambda: _async(a.registry.hive_ids() == []))

        await post_heartbeat(client, a, heartbeat("hive-y", [worker("w")]))
        stale = await on_b.next("hive_stale", timeout=5)
        assert isinstance(stale, HiveStaleEvent) and stale.hive_id == "hive-y"
        assert stale.silent_s >= 1.0
        await wait_for(lambda: _async(a.registry.get_hive("hive-y").stale))
        assert (await client.get(f"{a.urls[0]}/v1/workers?idle=true")).json() == []
        gone = await on_b.next("hive_removed", timeout=5)
        assert gone.hive_id == "hive-y" and "no heartbeat for" in gone.reason
        await wait_for(lambda: _async(a.registry.hive_ids() == b.registry.hive_ids() == []))
    for gone_id in ("1-0", "not-an-id"):  # not (or no longer) in the stream: a snapshot
        async with open_stream(client, a, headers={"Last-Event-ID": gone_id}) as resumed:
            assert isinstance(await resumed.next(), SnapshotEvent)


async def _async(value):
    return value


def queen_yaml(redis_url: str, prefix_store: dict) -> str:
    return yaml.safe_dump({
        "port": 0,
        "registry": {"stale_after_s": 2.0, "remove_after_s": 10.0, "cleanup_interval_s": 0.1,
                     "store": prefix_store},
        "stream": {"queen_interval_s": 0.5}})


def hive_yaml(queen_urls: list[str]) -> str:
    return yaml.safe_dump({
        "id": "failover-hive", "port": 0, "queen_url": queen_urls,
        "cgroup": {"backend": "none"}, "collect": {"gpu": "none"},
        "heartbeat": {"interval_s": INTERVAL, "backoff_initial_s": 0.05,
                      "backoff_max_s": INTERVAL, "connect_timeout_s": 1.0}})


class Recorder:
    """One SSE client: every event's id and decoded event, until the connection ends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.ended = trio.Event()

    async def follow(self, client: httpx.AsyncClient, url: str, last_id: str | None = None,
                     *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with aconnect_sse(client, "GET", f"{url}{STREAM_PATH}",
                                    headers=headers) as source:
                assert source.response.status_code == 200
                task_status.started()
                async for sse in source.aiter_sse():
                    self.events.append((sse.id, decode_stream_event(sse.data)))
        except httpx.TransportError:
            pass  # the queen was killed
        finally:
            self.ended.set()

    def ids(self) -> list[str]:
        return [event_id for event_id, _ in self.events]

    def telemetry(self) -> list[str]:
        return [i for i, e in self.events if isinstance(e, HiveTelemetryEvent)]


async def test_queen_killed_hive_and_clients_fail_over(tmp_path, client, redis_server):
    """Two queens, a hive posting to A, an SSE client on B that sees A's telemetry. SIGKILL A
    mid-stream: the hive moves to B within one interval; a client of A reconnects to B with
    Last-Event-ID and gets every event exactly once (compared with a client that stayed on B
    throughout); the sweeper's lease moves to B within 2 s, and no hive is marked stale."""
    shared = store(redis_server.url)
    with Daemon("rbee-queen", tmp_path / "a.yaml", queen_yaml(redis_server.url, shared)) as a:
        await wait_for(lambda: _health_says(client, a.url, sweeping=True), timeout=10)
        with Daemon("rbee-queen", tmp_path / "b.yaml", queen_yaml(redis_server.url, shared)) as b, \
                Daemon("rbee-hive", tmp_path / "hive.yaml", hive_yaml([a.url, b.url])) as hive:
            on_b, on_a = Recorder(), Recorder()
            async with trio.open_nursery() as nursery:
                await nursery.start(on_b.follow, client, b.url)
                await nursery.start(on_a.follow, client, a.url)
                # B's client sees the telemetry the hive sends to A
                await wait_for(lambda: _async(len(on_b.telemetry()) >= 3), timeout=10)
                link = (await client.get(f"{hive.url}/health")).json()["queen"]
                assert link["url"].rstrip("/") == a.url and link["reachable"]
                await wait_for(lambda: _async(len(on_a.telemetry()) >= 3), timeout=10)

                a.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await on_a.ended.wait()
                last_id = on_a.ids()[-1]
                # the lease: B sweeps within 2 s of A's death
                await wait_for(lambda: _health_says(client, b.url, sweeping=True), timeout=5)
                handover_s = time.monotonic() - killed_at
                # the client of A resumes on B
                resumed = Recorder()
                await nursery.start(resumed.follow, client, b.url, last_id)
                await wait_for(lambda: _async(len(resumed.telemetry()) >= 4), timeout=10)
                link = (await client.get(f"{hive.url}/health")).json()["queen"]
                nursery.cancel_scope.cancel()
            hive_log = hive.stderr()

        assert link["url"].rstrip("/") == b.url and link["reachable"]
        assert handover_s <= 2.0, f"the lease moved after {handover_s:.2f}s"
        # exactly once: A's part then B's resumed part is B's own record, gap-free
        reference = on_b.ids()
        seen = on_a.ids()[1:] + resumed.ids()  # A's first event is its own snapshot
        assert len(set(seen)) == len(seen), "an event came twice"
        start = reference.index(seen[0])
        assert reference[start:start + len(seen)] == seen
        assert all(not isinstance(e, HiveStaleEvent) for _, e in on_b.events + resumed.events)
        # the hive moved within one interval: its telemetry never paused longer than that
        # (Redis's receipt times, the stream ids), plus slack for this shared 2-core machine
        times = [entry_key(i)[0] / 1000 for i in on_b.telemetry()]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert max(gaps) <= INTERVAL + 0.6, f"telemetry paused {max(gaps):.2f}s"
        assert f"moving heartbeats to queen {b.url}" in hive_log


async def _health_says(client: httpx.AsyncClient, url: str, **expected) -> bool:
    try:
        got = await health(client, url)
    except httpx.TransportError:
        return False
    return all(got.get(key) == value for key, value in expected.items())


async def test_redis_restarted_under_load(nursery, client, tmp_path):
    """Redis killed (losing everything) while heartbeats pour in: the queen answers 503 to
    heartbeats and 'degraded' on /health, still serves the fleet it holds, never stops; when
    Redis is back it recovers by itself: the hives fill Redis again and stream clients get a
    fresh snapshot."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        queen = await start_queen(nursery, registry=registry(
            redis.url, connect_timeout_s=0.5, request_timeout_s=0.5))
        answers: dict[int, int] = {}

        async def hives_post() -> None:
            async with httpx.AsyncClient(timeout=2) as poster:
                for n in itertools.count():
                    for h in range(5):
                        try:
                            response = await poster.post(
                                f"{queen.urls[0]}/v1/hive-heartbeat",
                                content=encode(heartbeat(f"hive-{h}", [worker(f"w{n % 3}")])))
                            answers[response.status_code] = answers.get(
                                response.status_code, 0) + 1
                        except httpx.TransportError:
                            answers[0] = answers.get(0, 0) + 1
                    await trio.sleep(0.1)

        nursery.start_soon(hives_post)
        await wait_for(lambda: _async(len(queen.registry) == 5))
        async with open_stream(client, queen) as stream:
            await stream.next("snapshot")
            redis.kill()
            await wait_for(lambda: _health_says(client, queen.urls[0], status="degraded"),
                           timeout=5)
            down = await client.get(f"{queen.urls[0]}/health")
            assert down.status_code == 503 and "Redis at redis://" in down.json()["problem"]
            assert len((await client.get(f"{queen.urls[0]}/v1/hives")).json()) == 5
            await wait_for(lambda: _async(answers.get(503, 0) >= 5))
            redis.start()
            await wait_for(lambda: _health_says(client, queen.urls[0], status="ok"), timeout=15)
            snapshot = await stream.next("snapshot", timeout=10)
            assert isinstance(snapshot, SnapshotEvent)
            ok_before = answers.get(200, 0)
            await wait_for(lambda: _async(answers.get(200, 0) >= ok_before + 10), timeout=10)
            await wait_for(lambda: _async(len(queen.registry) == 5), timeout=5)
        assert not queen.stopped.is_set()
        assert answers.get(500, 0) == 0
    finally:
        redis.stop()


async def test_redis_unreachable_at_start(tmp_path):
    """A queen whose Redis does not answer says so, naming the URL and the key, and exits 1."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = tmp_path / "queen.yaml"
    config.write_text(yaml.safe_dump({"port": 0, "registry": {"store": {
        "kind": "redis", "url": url, "connect_timeout_s": 0.5}}}))
    with trio.fail_after(20):
        checked = await trio.run_process(
            [str(BIN / "rbee-queen"), "--config", str(config), "--check-config"],
            capture_stdout=True, capture_stderr=True, check=False)
        done = await trio.run_process([str(BIN / "rbee-queen"), "--config", str(config)],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert checked.returncode == 0  # the config is right; only starting needs Redis
    assert f"the fleet in Redis at {url}" in checked.stdout.decode()
    assert done.returncode == 1
    assert f"cannot reach Redis at {url} (registry.store.url)" in done.stderr.decode()


async def test_redis_store_keeps_the_registry_rules(nursery, client, redis_server, caplog):
    """The registry's rules hold with the redis store too: at most ``max_hives`` (fleet-wide,
    as every queen mirrors the fleet), new hives admitted at a bounded rate (429 with
    Retry-After), known hives never refused; and when most established hives fall silent at
    once the sweeper holds their removal (judged on Redis's clock, established from the first
    time Redis saw them), while a hive seen once and never again is removed all the same."""
    settings = registry(redis_server.url)
    settings.update(max_hives=5, new_hives_burst=3, new_hives_per_s=0.5,
                    established_after_s=0.3, mass_silence_min_hives=3, remove_after_s=1.5)
    a = await start_queen(nursery, registry=settings)
    b = await start_queen(nursery, registry=settings)
    for name in ("e1", "e2", "e3"):
        await post_heartbeat(client, a, heartbeat(name, [worker("w")]))
    refused = await client.post(f"{b.urls[0]}/v1/hive-heartbeat",
                                content=encode(heartbeat("burst", [worker("w")])))
    # b's own bucket is full: it admits this one; a's is spent
    assert refused.status_code == 200, refused.text
    late = await client.post(f"{a.urls[0]}/v1/hive-heartbeat",
                             content=encode(heartbeat("late", [worker("w")])))
    assert late.status_code == 429 and "registry.new_hives_per_s" in late.json()["message"], late.text
    assert int(late.headers["Retry-After"]) >= 1
    await post_heartbeat(client, b, heartbeat("fifth", [worker("w")]))
    await wait_for(lambda: _async(len(a.registry) == 5))
    full = await client.post(f"{a.urls[0]}/v1/hive-heartbeat",
                             content=encode(heartbeat("sixth", [worker("w")])))
    assert full.status_code == 503 and "registry.max_hives: 5" in full.json()["message"]
    assert (await client.post(f"{b.urls[0]}/v1/hive-heartbeat",  # a known hive: never refused
                              content=encode(heartbeat("burst", [worker("w")])))).status_code == 200
    async with open_stream(client, b) as on_b:
        await on_b.next("snapshot")
        with trio.move_on_after(0.6):  # e1..e3 become established; the others are not
            while True:
                for name in ("e1", "e2", "e3"):
                    await post_heartbeat(client, a, heartbeat(name, [worker("w")]))
                await trio.sleep(0.1)
        removed = {(await on_b.next("hive_removed", timeout=5)).hive_id for _ in range(2)}
        assert removed == {"burst", "fifth"}
        with trio.fail_after(10):  # the sweeper judges e1..e3 silent past remove_after_s: held
            while "3 of 3 established hives are silent at once" not in caplog.text:
                await trio.sleep(0.05)
    # that verdict and the last removal may come from one sweep: b's mirror read it (b's stream
    # delivered the removals), a's reads the stream every FOLLOW_BATCH_S and may not have yet
    upto = entry_key(b.fleet.store.mirror.position)
    await wait_for(lambda: _async(entry_key(a.fleet.store.mirror.position) >= upto))
    assert a.registry.hive_ids() == b.registry.hive_ids() == ["e1", "e2", "e3"]
    assert all(h.stale for h in b.registry.hives())
