"""The stream's filters (``?hive=``, ``?model=``, ``?events=``) and its ``worker_update`` event,
through a real queen on 127.0.0.1 and real SSE clients (httpx-sse, and ``rbee.stream_client``).
"""

from __future__ import annotations

import datetime
import ssl

import httpx
import msgspec
import pytest
import trio
import trio.testing

from rbee.contract import (
    EngineState,
    HiveRemovedEvent,
    HiveTelemetryEvent,
    QueenEvent,
    SnapshotEvent,
    WorkerUpdateEvent,
    decode_stream_event,
    utc_now,
)
from rbee.queen.broadcast import Broadcaster, Subscription
from rbee.queen.streamfilter import StreamFilter
from rbee.stream_client import follow_stream

from .builders import fleet_heartbeat, heartbeat, worker
from .queenkit import (
    STREAM_PATH,
    open_stream,
    post_heartbeat,
    small_window_client,
    start_queen,
    url_of,
)
from .test_hardening import tls_files as tls_files_fixture
from .test_redis_store import redis_server as redis_server_fixture
from .test_redis_store import registry as redis_registry
from .test_sse_stream import QUIET
from .test_sse_stream import client as client_fixture

client = client_fixture  # an httpx client with no read timeout, as the SSE tests use


def engine(running: int, waiting: int) -> EngineState:
    return EngineState(engine="vllm", requests_running=running, requests_waiting=waiting,
                       kv_cache_pct=12.0, sampled_at=utc_now())


async def test_hive_filter_snapshot_and_live(nursery, client):
    queen = await start_queen(nursery, **QUIET)
    for hive_id in ("hive-a", "hive-b", "hive-c"):
        await post_heartbeat(client, queen, heartbeat(hive_id, [worker("w")]))
    async with open_stream(client, queen, params={"hive": "hive-a,hive-c"}) as stream:
        snapshot = await stream.next()
        for hive_id in ("hive-b", "hive-c", "hive-b", "hive-a"):
            await post_heartbeat(client, queen, heartbeat(hive_id, [worker("w")]))
        live = [await stream.next(), await stream.next()]
    assert isinstance(snapshot, SnapshotEvent)
    assert [h.hive.id for h in snapshot.hives] == ["hive-a", "hive-c"]
    assert [(type(e).__name__, e.hive_id) for e in live] == [
        ("HiveTelemetryEvent", "hive-c"), ("HiveTelemetryEvent", "hive-a")]


async def test_model_filter_keeps_matching_workers_and_says_when_they_go(nursery, client):
    """A model filter shows a hive's matching workers only (and only those among its idle); a
    hive whose last matching worker left gets one event with none, then is quiet."""
    queen = await start_queen(nursery, **QUIET)
    mixed = [worker("q1", model="qwen"), worker("l1", model="llama"), worker("q2", model="qwen")]
    await post_heartbeat(client, queen, heartbeat("hive-a", mixed))
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("l2", model="llama")]))
    async with open_stream(client, queen, params={"model": "qwen"}) as stream:
        snapshot = await stream.next()
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("l2", model="llama")]))
        await post_heartbeat(client, queen, heartbeat("hive-a", mixed))
        live = await stream.next()
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("l1", model="llama")]))
        emptied = await stream.next()
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("l1", model="llama")]))
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("q3", model="qwen")]))
        back = await stream.next()
    assert [(h.hive.id, [w.instance for w in h.workers], h.idle) for h in snapshot.hives] == [
        ("hive-a", ["q1", "q2"], ["llm/q1", "llm/q2"])]
    assert isinstance(live, HiveTelemetryEvent)
    assert (live.hive_id, [w.instance for w in live.workers]) == ("hive-a", ["q1", "q2"])
    assert live.idle == ["llm/q1", "llm/q2"]
    assert (emptied.hive_id, emptied.workers, emptied.idle) == ("hive-a", [], [])
    assert (back.hive_id, [w.instance for w in back.workers]) == ("hive-a", ["q3"])


async def test_worker_update_carries_only_what_changed(nursery, client):
    queen = await start_queen(nursery, **QUIET)
    first = heartbeat("hive-a", [worker("a", engine=engine(1, 0)), worker("b"), worker("c")])
    await post_heartbeat(client, queen, first)
    async with open_stream(client, queen, params={"events": "worker_update"}) as stream:
        assert isinstance(await stream.next(), SnapshotEvent)
        changed_engine = engine(3, 7)
        second = heartbeat("hive-a", [worker("a", engine=changed_engine), worker("b"),
                                      worker("d", cpu_pct=5.0)])
        await post_heartbeat(client, queen, second)
        raws = [await stream.next_raw() for _ in range(3)]
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("e")]))
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("e", rss_mb=900)]))
        new = await stream.next()
        grown = await stream.next()
    updates = {(u.instance): u for u in map(decode_stream_event, (r.data for r in raws))}
    assert set(updates) == {"a", "c", "d"}  # b did not change: nothing about it
    a = updates["a"]
    assert isinstance(a, WorkerUpdateEvent)
    assert (a.hive_id, a.group, a.timestamp) == ("hive-a", "llm", second.timestamp)
    assert msgspec.structs.asdict(a.fields) | {} == {
        **{k: msgspec.UNSET for k in msgspec.structs.asdict(a.fields)}, "engine": changed_engine}
    assert a.fields.engine.sampled_at == changed_engine.sampled_at  # the figures' age
    c = next(msgspec.json.decode(r.data) for r in raws if '"instance":"c"' in r.data)
    assert c["removed"] is True and c["fields"] == {}
    d = updates["d"]
    assert (d.removed, d.fields.cpu_pct, d.fields.pid, d.fields.model) == (
        False, 5.0, 4242, "llama-3-8b")
    # only the last carries the heartbeat's id (the others keep the one before, as SSE does)
    assert raws[0].id == raws[1].id and int(raws[1].id) < int(raws[2].id)
    assert (new.instance, new.fields.rss_mb) == ("e", 512)
    assert (grown.instance, grown.fields.rss_mb, grown.fields.cpu_pct) == (
        "e", 900, msgspec.UNSET)


async def test_worker_update_for_a_removed_hive_and_with_telemetry(nursery, client):
    """Asked together, a heartbeat's hive_telemetry comes first and its updates after; a hive
    removed by request removes each of its workers."""
    queen = await start_queen(nursery, **QUIET)
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    params = {"events": "hive_telemetry,worker_update,hive_removed"}
    async with open_stream(client, queen, params=params) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a", cpu_pct=99.0)]))
        telemetry, update = await stream.next(), await stream.next()
        assert (await client.delete(f"{url_of(queen)}/v1/hives/hive-a")).status_code == 200
        removed, gone = await stream.next(), await stream.next()
    assert isinstance(telemetry, HiveTelemetryEvent)
    assert isinstance(update, WorkerUpdateEvent) and update.fields.cpu_pct == 99.0
    assert isinstance(removed, HiveRemovedEvent)
    assert isinstance(gone, WorkerUpdateEvent) and (gone.instance, gone.removed) == ("a", True)


async def test_events_filter_leaves_out_the_others(nursery, client):
    queen = await start_queen(nursery, stream={"queen_interval_s": 0.05, "keepalive_s": 3600})
    async with open_stream(client, queen, params={"events": "queen"}) as stream:
        assert isinstance(await stream.next(), SnapshotEvent)
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
        summaries = [await stream.next() for _ in range(3)]
    assert all(isinstance(e, QueenEvent) for e in summaries)
    assert summaries[-1].summary.workers_total == 1


async def test_resume_with_filters(nursery, client):
    """Resuming with Last-Event-ID, a filtered client gets the events it missed as its filter
    shows them, then the live stream filtered the same way."""
    queen = await start_queen(nursery, **QUIET)
    params = {"hive": "hive-b,hive-c", "events": "hive_telemetry,hive_removed"}
    async with open_stream(client, queen, params=params) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b")]))
        last = await stream.next_raw()
    for hive_id, cpu in (("hive-a", 1.0), ("hive-b", 2.0), ("hive-c", 3.0)):
        await post_heartbeat(client, queen, heartbeat(hive_id, [worker("x", cpu_pct=cpu)]))
    await client.delete(f"{url_of(queen)}/v1/hives/hive-a")
    await client.delete(f"{url_of(queen)}/v1/hives/hive-c")
    async with open_stream(client, queen, headers={"Last-Event-ID": last.id},
                           params=params) as stream:
        missed = [await stream.next(), await stream.next(), await stream.next()]
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("y")]))
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("x", cpu_pct=4.0)]))
        live = await stream.next()
    assert [(type(e).__name__, e.hive_id) for e in missed] == [
        ("HiveTelemetryEvent", "hive-b"), ("HiveTelemetryEvent", "hive-c"),
        ("HiveRemovedEvent", "hive-c")]
    assert [w.cpu_pct for w in missed[0].workers] == [2.0]
    assert (live.hive_id, live.workers[0].cpu_pct) == ("hive-b", 4.0)


async def test_resume_with_worker_updates(nursery, client):
    """A ``worker_update`` client that missed heartbeats gets a snapshot instead (what changed
    since its last event is not kept: the store keeps whole heartbeats); with nothing of its
    hives missed it resumes, then hears the updates live."""
    queen = await start_queen(nursery, **QUIET)
    params = {"hive": "hive-b", "events": "worker_update"}
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b")]))
    async with open_stream(client, queen, params=params) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b", cpu_pct=1.0)]))
        last = await stream.next_raw()
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))  # not its hive
    async with open_stream(client, queen, headers={"Last-Event-ID": last.id},
                           params=params) as stream:
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b", cpu_pct=2.0)]))
        resumed = await stream.next()
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b", cpu_pct=3.0)]))
    async with open_stream(client, queen, headers={"Last-Event-ID": last.id},
                           params=params) as stream:
        restarted = await stream.next()
    assert isinstance(resumed, WorkerUpdateEvent) and resumed.fields.cpu_pct == 2.0
    assert isinstance(restarted, SnapshotEvent)
    assert restarted.hives[0].workers[0].cpu_pct == 3.0


@pytest.mark.parametrize(("query", "named"), [
    ("events=worker_update,bogus", "'bogus'"),
    ("events=snapshot", "'snapshot'"),
    ("hive=hive-a,not/an-id", "'not/an-id'"),
    ("hive=hive-a,,hive-b", "empty item"),
    ("model=" + "m" * 300, "longer than"),
    ("hives=hive-a", "hives"),
])
async def test_bad_filters_answer_400_naming_them(nursery, client, query, named):
    queen = await start_queen(nursery, **QUIET)
    response = await client.get(f"{url_of(queen)}{STREAM_PATH}?{query}")
    assert response.status_code == 400
    assert named in response.json()["message"]
    assert queen.broadcaster.client_count == 0


async def test_stream_client_follows_a_filter(nursery, client):
    """``rbee.stream_client.follow_stream`` passes its filters on."""
    queen = await start_queen(nursery, **QUIET)
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a", model="qwen")]))
    got: list = []
    arrived = trio.Event()

    def on_event(event) -> None:
        got.append(event)
        if isinstance(event, WorkerUpdateEvent):
            arrived.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(lambda: follow_stream(url_of(queen), on_event, hives=["hive-a"],
                                               models=["qwen"], events=["worker_update"]))
        with trio.fail_after(5):
            while queen.broadcaster.client_count == 0:
                await trio.sleep(0.01)
        await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b", model="qwen")]))
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a", model="qwen"),
                                                                 worker("c", model="llama")]))
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a", model="qwen",
                                                                        cpu_pct=70.0)]))
        with trio.fail_after(5):
            await arrived.wait()
        inner.cancel_scope.cancel()
    assert isinstance(got[0], SnapshotEvent)
    assert [(e.hive_id, e.instance, e.fields.cpu_pct) for e in got[1:]] == [
        ("hive-a", "a", 70.0)]


def test_one_frame_per_filter_shared_by_its_clients():
    """Clients with the same filter get the very same frame object (made once per filter);
    unfiltered clients the broadcaster's shared one."""
    broadcaster = Broadcaster(client_buffer=16, max_clients=10, client_buffer_bytes=1 << 20,
                              write_chunk_bytes=1 << 16,
                              snapshot=lambda: SnapshotEvent(hives=[], timestamp=utc_now()))
    only_a = StreamFilter(hives=frozenset({"hive-a"}))
    with broadcaster.subscribe() as plain1, broadcaster.subscribe() as plain2, \
            broadcaster.subscribe(only_a) as a1, broadcaster.subscribe(only_a) as a2:
        event = HiveTelemetryEvent(hive_id="hive-a", timestamp=datetime.datetime.now(datetime.UTC),
                                   workers=[worker("w")])
        broadcaster.publish(event, "7")
        broadcaster.publish(HiveTelemetryEvent(hive_id="hive-b", timestamp=utc_now(),
                                               workers=[]), "8")
        assert broadcaster.client_count == 4
        frames = [list(s._backlog) for s in (plain1, plain2, a1, a2)]
        with broadcaster.subscribe(StreamFilter(events=frozenset({"worker_update"}))) as ups:
            broadcaster.publish(HiveTelemetryEvent(hive_id="hive-c", timestamp=utc_now(),
                                                   workers=[worker("x"), worker("y")]), "9")
            updates = list(ups._backlog)
    assert len(frames[0]) == 2 and frames[0][0] is frames[1][0]
    assert len(frames[2]) == 1 and frames[2][0] is frames[3][0] is frames[0][0]
    assert len(updates) == 1 and updates[0].count(b"event: heartbeat") == 2
    assert updates[0].count(b"id: ") == 1 and updates[0].startswith(b"event:")  # on the last
    assert broadcaster.client_count == 0


tls_files = tls_files_fixture


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1-connection", "http2-app"])
async def test_filtered_stream_over_tls(nursery, tls_files, http2):
    """Over TLS the stream is the same, served by the connection (HTTP/1.1, no direct writes:
    the socket carries TLS) or by the app (HTTP/2)."""
    queen = await start_queen(nursery, http={"tls_cert_file": tls_files["cert"],
                                             "tls_key_file": tls_files["key"]}, **QUIET)
    context = ssl.create_default_context(cafile=tls_files["ca"])
    async with httpx.AsyncClient(http2=http2, verify=context,
                                 timeout=httpx.Timeout(5.0, read=None)) as tls:
        await post_heartbeat(tls, queen, heartbeat("hive-a", [worker("a")]))
        await post_heartbeat(tls, queen, heartbeat("hive-b", [worker("b")]))
        async with open_stream(tls, queen, params={"hive": "hive-b"}) as stream:
            assert stream.response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            snapshot = await stream.next()
            await post_heartbeat(tls, queen, heartbeat("hive-a", [worker("a")]))
            await post_heartbeat(tls, queen, heartbeat("hive-b", [worker("b", cpu_pct=1.0)]))
            live = await stream.next()
    assert [h.hive.id for h in snapshot.hives] == ["hive-b"]
    assert (live.hive_id, live.workers[0].cpu_pct) == ("hive-b", 1.0)


async def test_a_request_the_connection_leaves_to_the_app_is_served_the_same(nursery, client):
    """A head the connection does not take (a repeated field) goes to Starlette, which serves
    the same filtered stream (chunked, through sse-starlette)."""
    queen = await start_queen(nursery, **QUIET)
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b")]))
    host, port = url_of(queen).removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(5):
        sock = await trio.open_tcp_stream(host, int(port))
        async with sock:
            await sock.send_all(b"GET /v1/heartbeats/stream?hive=hive-a HTTP/1.1\r\nHost: q\r\n"
                                b"X-Twice: 1\r\nX-Twice: 2\r\n\r\n")
            received = b""
            while b"snapshot" not in received or not received.endswith(b"\r\n\r\n"):
                received += await sock.receive_some(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b'"hive-a"' in body and b'"hive-b"' not in body


async def test_keepalives_never_split_a_frame(nursery, client):
    """Frames written straight to a full socket go out in part, the rest after; keep-alive
    comments every 5 ms never land in between: a client that stalled, then reads, finds every
    block of its bytes a whole event or a whole comment, the events in order."""
    queen = await start_queen(nursery, stream={"queen_interval_s": 3600, "keepalive_s": 0.005,
                                               "client_buffer": 1024})
    async with small_window_client() as slow, slow.stream(
            "GET", f"{url_of(queen)}{STREAM_PATH}?events=hive_telemetry") as response:
        chunks = response.aiter_raw()
        received = await anext(chunks)
        for n in range(40):
            await post_heartbeat(client, queen, fleet_heartbeat("hive-a", 8 + n % 8))
            await trio.sleep(0.002)  # keep-alive time passes while the socket is full
        with trio.fail_after(20):
            while (received.count(b"event: heartbeat") < 41
                   or not received.endswith(b"\r\n\r\n")):
                received += await anext(chunks)
    blocks = received.split(b"\r\n\r\n")
    assert blocks.pop() == b""
    sizes = []
    for block in blocks:
        if block == b": ping":
            continue
        lines = block.split(b"\r\n")
        fields = [line.split(b": ", 1)[0] for line in lines]
        assert fields[:3] == [b"id", b"event", b"data"] and fields[3:] in ([], [b"retry"]), block
        event = decode_stream_event(lines[2].removeprefix(b"data: "))
        sizes.append(len(event.workers) if isinstance(event, HiveTelemetryEvent) else "snapshot")
    assert sizes == ["snapshot", *(8 + n % 8 for n in range(40))]
    assert b": ping" in blocks


async def test_frames_go_straight_to_an_idle_clients_socket():
    """A frame published while the client's writer waits goes to its socket at once (no task
    woken); a part the socket did not take waits in the backlog and goes first; while the
    writer writes, frames queue behind it."""
    taken: list[bytes] = []
    room = [100]

    def direct(data: bytes) -> int:
        n = min(room[0], len(data))
        taken.append(data[:n])
        room[0] -= n
        return n

    subscription = Subscription(16, 1 << 20, 1 << 16, direct=direct)
    writes: list[bytes] = []

    async def writer(task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for piece in subscription.frames(lambda dropped: iter(())):
            writes.append(piece)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer)
        await trio.testing.wait_all_tasks_blocked()
        subscription.offer(b"a" * 60)  # straight in
        subscription.offer(b"b" * 60)  # 40 of it straight in, 20 left
        subscription.offer(b"c" * 10)  # behind the rest
        assert b"".join(taken) == b"a" * 60 + b"b" * 40 and writes == []
        await trio.testing.wait_all_tasks_blocked()
        assert writes == [b"b" * 20 + b"c" * 10]
        subscription.close()


redis_server = redis_server_fixture


async def test_filters_and_worker_updates_through_a_shared_store(nursery, client, redis_server):
    """With two queens on Redis, a filtered client of queen B hears of queen A's heartbeats as
    its filter shows them: its worker updates, and a removal (which B reads from Redis as
    JSON)."""
    settings = {"registry": redis_registry(redis_server.url), **QUIET}
    a = await start_queen(nursery, **settings)
    b = await start_queen(nursery, **settings)
    await post_heartbeat(client, a, heartbeat("hive-x", [worker("w1")]))
    await post_heartbeat(client, a, heartbeat("hive-y", [worker("w2")]))
    params = {"hive": "hive-x", "events": "worker_update,hive_removed"}
    async with open_stream(client, b, params=params) as stream:
        snapshot = await stream.next(timeout=5)
        await post_heartbeat(client, a, heartbeat("hive-y", [worker("w2", cpu_pct=3.0)]))
        await post_heartbeat(client, a, heartbeat("hive-x", [worker("w1", cpu_pct=9.0)]))
        update = await stream.next(timeout=5)
        assert (await client.delete(f"{a.urls[0]}/v1/hives/hive-x")).status_code == 200
        removed, gone = await stream.next(timeout=5), await stream.next(timeout=5)
    assert [h.hive.id for h in snapshot.hives] == ["hive-x"]
    assert isinstance(update, WorkerUpdateEvent) and (update.hive_id, update.fields.cpu_pct) == (
        "hive-x", 9.0)
    assert isinstance(removed, HiveRemovedEvent) and removed.hive_id == "hive-x"
    assert isinstance(gone, WorkerUpdateEvent) and (gone.instance, gone.removed) == ("w1", True)
