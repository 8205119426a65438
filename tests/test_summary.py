"""The fleet summary kept incrementally (``rbee.queen.summary.FleetTotals``): after any sequence
of heartbeats, stale flags, removals and worker updates, and with the registry changing between
the parts a summary is computed in, the ``queen`` event equals the one computed from scratch over
the registry as it is when the event is made (``HiveRegistry.summary``)."""

from __future__ import annotations

import random

import msgspec
import pytest
import trio

from rbee.config import RegistrySettings
from rbee.contract import EngineState, OperationalStatus, Unhealthy, WorkerState, decode_stream_event
from rbee.queen import summary as summary_module
from rbee.queen.registry import HiveRegistry
from rbee.queen.summary import FleetTotals

from .builders import GIB, gpu, heartbeat, worker

MODELS = ["llama", "qwen", None]
STATES = [WorkerState.RUNNING, WorkerState.RUNNING, WorkerState.STARTING]


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def random_heartbeat(rng: random.Random, hive_id: str):
    gpus = [gpu(i, total_gib=80, used_gib=rng.uniform(0, 80), util_pct=rng.uniform(0, 100))
            for i in range(rng.randint(0, 4))]
    if gpus and rng.random() < 0.2:
        gpus[0] = msgspec.structs.replace(gpus[0], health=Unhealthy(reason="xid 79"))
    workers = []
    for n in range(rng.randint(0, 6)):
        engine = (EngineState(engine="vllm", requests_running=rng.randint(0, 3),
                              requests_waiting=rng.randint(0, 5))
                  if rng.random() < 0.6 else None)
        workers.append(worker(f"w{n}", group=rng.choice(["llm", "emb"]),
                              model=rng.choice(MODELS), gpu_util_pct=rng.uniform(0, 100),
                              gpu_indices=[n % len(gpus)] if gpus else [],
                              vram_mb=rng.randint(0, 9000), total_vram_mb=80 * GIB,
                              state=rng.choice(STATES), engine=engine,
                              cpu_pct=round(rng.uniform(0, 400), 2),
                              rss_mb=rng.randint(0, 20000)))
    status = rng.choice([OperationalStatus.READY] * 4 + [OperationalStatus.BUSY, OperationalStatus.STARTING])
    return heartbeat(hive_id, workers, gpus, status=status)


def change(rng: random.Random, registry: HiveRegistry, clock: Clock, hive_ids: list[str]) -> None:
    """One random change of the registry, as the queen makes them."""
    hive_id = rng.choice(hive_ids)
    what = rng.random()
    if what < 0.6:
        registry.update_hive(random_heartbeat(rng, hive_id))
    elif what < 0.7:
        registry.remove_hive(hive_id)
    elif what < 0.8 and registry.knows(hive_id):
        registry.update_workers(hive_id, random_heartbeat(rng, hive_id).workers)
    elif what < 0.9:
        registry.mark_stale(hive_id)
    else:
        clock.now += rng.uniform(0, 4)
        registry.sweep()


def same(data: bytes, reference):
    """The event in ``data`` (JSON, as the stream sends it) is ``reference`` but for the time."""
    event = decode_stream_event(data)
    assert msgspec.structs.replace(event, timestamp=reference.timestamp) == reference
    return event


def totals_of(registry: HiveRegistry) -> FleetTotals:
    totals = FleetTotals(registry.settings, registry.hive_ids)
    registry.observe(totals.hive_changed)
    return totals


SETTINGS = RegistrySettings(stale_after_s=3, remove_after_s=10, idle_gpu_util_pct=5,
                            skip_unhealthy_gpus=True)


@pytest.mark.parametrize("seed", range(5))
def test_totals_follow_every_kind_of_change(seed):
    rng, clock = random.Random(seed), Clock()
    registry = HiveRegistry(SETTINGS, clock=clock)
    hive_ids = [f"hive-{n:02d}" for n in range(30)]
    for hive_id in hive_ids[:10]:
        registry.update_hive(random_heartbeat(rng, hive_id))
    totals = totals_of(registry)  # follows a registry that already holds hives
    seen_workers = 0
    for _ in range(40):
        for _ in range(rng.randint(0, 25)):
            change(rng, registry, clock, hive_ids)
        event = same(totals.event_now(), registry.summary())
        seen_workers = max(seen_workers, event.workers_online)
    assert seen_workers > 20  # the fleet was not trivially empty


async def test_a_summary_in_parts_is_the_registry_at_one_instant(monkeypatch):
    """With three hives a part, the registry changes at every checkpoint between the parts (and
    between the event's figures and its JSON); the event still equals the whole computation over
    the registry at the instant it was asked for."""
    monkeypatch.setattr(summary_module, "HIVES_PER_PART", 3)
    rng, clock = random.Random(7), Clock()
    registry = HiveRegistry(SETTINGS, clock=clock)
    hive_ids = [f"hive-{n:02d}" for n in range(40)]
    for hive_id in hive_ids:
        registry.update_hive(random_heartbeat(rng, hive_id))
    totals = totals_of(registry)
    changes = 0
    begin, at_that_instant = totals._begin, []

    def beginning():
        instant = begin()
        at_that_instant.append(registry.summary())  # no checkpoint between
        return instant

    monkeypatch.setattr(totals, "_begin", beginning)

    async def meddle() -> None:
        nonlocal changes
        while True:
            change(rng, registry, clock, hive_ids)
            changes += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meddle)
        for _ in range(10):
            await trio.lowlevel.checkpoint()
            same(await totals.event(), at_that_instant.pop())
        nursery.cancel_scope.cancel()
    assert changes >= 10  # the registry did change while summaries were in parts


async def test_the_parts_let_other_tasks_run(monkeypatch):
    """40 changed hives at three a part: the summary yields to the loop about 13 times."""
    monkeypatch.setattr(summary_module, "HIVES_PER_PART", 3)
    registry = HiveRegistry(SETTINGS, clock=Clock())
    rng = random.Random(3)
    for n in range(40):
        registry.update_hive(random_heartbeat(rng, f"hive-{n:02d}"))
    totals = totals_of(registry)
    steps = 0

    async def count() -> None:
        nonlocal steps
        while True:
            steps += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count)
        await trio.lowlevel.checkpoint()
        before = steps
        same(await totals.event(), registry.summary())
        assert steps - before >= 12
        nursery.cancel_scope.cancel()


def test_cpu_is_summed_without_drift():
    """A share added and taken away again leaves the total as it was: a float running total
    would have lost hive a's 0.3 % beside hive b's huge figure (1e17 % from a broken hive) and
    kept 0.0 once b reported 0 again."""
    registry = HiveRegistry(SETTINGS, clock=Clock())
    totals = totals_of(registry)
    registry.update_hive(heartbeat("a", [worker("w0", cpu_pct=0.3)]))
    for cpu in (1e17, 2.5, 1e17, 0.0):
        registry.update_hive(heartbeat("b", [worker("w0", cpu_pct=cpu)]))
        totals.event_now()
    event = same(totals.event_now(), registry.summary())
    assert event.summary.cpu_pct == 0.3


def test_filtered_clients_get_the_summary_whole_and_never_decode_it(monkeypatch):
    """The summary's JSON goes to every client whose ``events`` has ``queen``, filtered by hive
    or model or not, as the same frame, without being decoded; a client without ``queen`` in
    its events gets nothing of it."""
    from rbee.contract import SnapshotEvent, utc_now
    from rbee.queen import broadcast
    from rbee.queen.broadcast import Broadcaster
    from rbee.queen.streamfilter import DEFAULT_STREAM_EVENTS, StreamFilter

    registry = HiveRegistry(SETTINGS, clock=Clock())
    totals = totals_of(registry)
    rng = random.Random(1)
    for n in range(5):
        registry.update_hive(random_heartbeat(rng, f"hive-{n}"))
    data = totals.event_now()
    decoded = []
    monkeypatch.setattr(broadcast, "decode_stream_event",
                        lambda raw: decoded.append(raw) or decode_stream_event(raw))
    broadcaster = Broadcaster(client_buffer=16, max_clients=10, client_buffer_bytes=1 << 24,
                              write_chunk_bytes=1 << 16,
                              snapshot=lambda: SnapshotEvent(hives=[], timestamp=utc_now()))
    by_hive = StreamFilter(hives=frozenset({"hive-1"}))
    by_model = StreamFilter(models=frozenset({"qwen"}), events=DEFAULT_STREAM_EVENTS)
    no_queen = StreamFilter(events=frozenset({"hive_telemetry"}))
    with broadcaster.subscribe() as plain, broadcaster.subscribe(by_hive) as hive, \
            broadcaster.subscribe(by_model) as model, broadcaster.subscribe(no_queen) as none:
        broadcaster.publish(data, "12")
        got = [list(s._backlog) for s in (plain, hive, model, none)]
    assert "queen" in DEFAULT_STREAM_EVENTS
    assert got[0] == got[1] == got[2] == [b"id: 12\r\nevent: heartbeat\r\ndata: " + data
                                          + b"\r\n\r\n"]
    assert got[3] == [] and decoded == []


async def test_the_sweeping_queen_sends_the_summary_of_the_shared_fleet(nursery, tmp_path_factory):
    """With the redis store the sweeping queen's summary (its ``FleetTotals`` following its
    mirror) reaches the other queen's stream, naming the hive posted to the first queen."""
    import httpx

    from rbee.contract import QueenEvent

    from .queenkit import open_stream, post_heartbeat, start_queen
    from .rediskit import running_redis
    from .test_redis_store import registry

    with running_redis(tmp_path_factory.mktemp("redis")) as redis_server:
        settings = {"registry": registry(redis_server.url), "stream": {"queen_interval_s": 0.2}}
        a = await start_queen(nursery, **settings)
        b = await start_queen(nursery, **settings)
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
            await post_heartbeat(client, a, heartbeat("hive-x", [worker("w1"), worker("w2")]))
            async with open_stream(client, b) as on_b:
                for _ in range(20):
                    event = await on_b.next("queen", timeout=5)
                    assert isinstance(event, QueenEvent)
                    if event.hive_ids:
                        break
        assert event.hive_ids == ["hive-x"]
        assert event.worker_ids == ["hive-x/llm/w1", "hive-x/llm/w2"]
        assert event.summary.workers_total == 2
        a.stop()
        b.stop()


async def test_the_store_sends_the_summary_every_queen_interval(nursery, mock_clock,
                                                                 monkeypatch):
    """Under a MockClock: the memory store's summary goes out every ``stream.queen_interval_s``,
    as the registry is at that moment (a hive that joins between two summaries is in the
    second), as JSON that the stream sends as it is."""
    from rbee.config import QueenConfig, StreamSettings
    from rbee.queen.fleet import open_fleet

    config = QueenConfig(stream=StreamSettings(queen_interval_s=2.5),
                         registry=RegistrySettings(stale_after_s=60, remove_after_s=120))
    fleet = open_fleet(config, clock=trio.current_time)
    sent: list[tuple[float, bytes]] = []
    publish = fleet.broadcaster.publish
    monkeypatch.setattr(fleet.broadcaster, "publish", lambda event, event_id: (
        sent.append((trio.current_time(), event)), publish(event, event_id)))
    start = trio.current_time()
    await nursery.start(fleet.store.run)
    with fleet.broadcaster.subscribe():  # a client listens: the store publishes to it
        await fleet.store.ingest(heartbeat("hive-a", [worker("w1"), worker("w2")]))
        await trio.sleep(3.0)
        await fleet.store.ingest(heartbeat("hive-b", [worker("w1")]))
        await trio.sleep(4.6)
    summaries = [(at - start, decode_stream_event(raw)) for at, raw in sent
                 if isinstance(raw, bytes)]
    assert [at for at, _ in summaries] == [2.5, 5.0, 7.5]
    assert summaries[0][1].worker_ids == ["hive-a/llm/w1", "hive-a/llm/w2"]
    assert summaries[1][1].hive_ids == ["hive-a", "hive-b"]
    assert summaries[2][1].summary.workers_total == 3


async def test_no_summary_is_made_while_nobody_listens(nursery, mock_clock, monkeypatch):
    """Under a MockClock: the summary is for stream clients, so with none listening the store
    computes none (no hive's share), and the first one after a client comes, at the next
    ``stream.queen_interval_s``, is the fleet as it is then, changes made unheard included."""
    from rbee.config import QueenConfig, StreamSettings
    from rbee.queen.fleet import open_fleet

    config = QueenConfig(stream=StreamSettings(queen_interval_s=2.5),
                         registry=RegistrySettings(stale_after_s=60, remove_after_s=120))
    fleet = open_fleet(config, clock=trio.current_time)
    made: list[float] = []
    event = fleet.store.totals.event
    monkeypatch.setattr(fleet.store.totals, "event",
                        lambda: (made.append(trio.current_time()), event())[1])
    sent: list[bytes] = []
    publish = fleet.broadcaster.publish
    monkeypatch.setattr(fleet.broadcaster, "publish", lambda event, event_id: (
        sent.append(event), publish(event, event_id)))
    start = trio.current_time()
    await nursery.start(fleet.store.run)
    await fleet.store.ingest(heartbeat("hive-a", [worker("w1"), worker("w2")]))
    await trio.sleep(6.0)
    await fleet.store.ingest(heartbeat("hive-b", [worker("w1")]))
    await trio.sleep(5.0)  # 11.0: between two ticks, so the client comes before the next
    assert made == [] and sent == []
    with fleet.broadcaster.subscribe():
        await trio.sleep(2.6)
    assert [at - start for at in made] == [12.5]
    (summary,) = [decode_stream_event(raw) for raw in sent if isinstance(raw, bytes)]
    assert summary.hive_ids == ["hive-a", "hive-b"]
    assert summary.worker_ids == ["hive-a/llm/w1", "hive-a/llm/w2", "hive-b/llm/w1"]
    assert summary.summary.workers_total == 3
