"""The live stream, GET /v1/heartbeats/stream: a real queen on 127.0.0.1 and real SSE clients.

The seed's SSE tests keep their names; the rest cover what the seed left open: keep-alives,
removal announcements, a stalled client, the client limit, and shutdown with clients attached.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import trio

from rbee.config import QueenConfig, parse_config
from rbee.contract import (
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    LaggedEvent,
    QueenEvent,
    SnapshotEvent,
    WorkerState,
    decode_stream_event,
    encode,
)
from rbee.queen.broadcast import Subscription
from rbee.queen.fleet import open_fleet
from rbee.queen.server import QueenServer

from .builders import fleet_heartbeat, gpu, heartbeat, worker
from .queenkit import (
    STREAM_PATH,
    open_stream,
    post_heartbeat,
    small_window_client,
    start_queen,
    url_of,
    wait_until,
)

QUIET = {"stream": {"queen_interval_s": 3600, "keepalive_s": 3600}}
"""No periodic traffic: what a test sees is caused by what it did."""


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        yield client


async def test_stream_sends_queen_heartbeat(nursery, client):
    queen = await start_queen(nursery, stream={"queen_interval_s": 0.1})
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a"), worker("b")]))
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("c", gpu_util_pct=80.0)]))
    async with open_stream(client, queen) as stream:
        event = await stream.next("queen")
    assert isinstance(event, QueenEvent)
    assert (event.workers_online, event.workers_available) == (3, 2)
    assert (event.hives_online, event.hives_available) == (2, 2)
    assert event.hive_ids == ["hive-a", "hive-b"]
    assert event.worker_ids == ["hive-a/llm/a", "hive-a/llm/b", "hive-b/llm/c"]


async def test_stream_forwards_hive_telemetry(nursery, client):
    queen = await start_queen(nursery, **QUIET)
    sent = heartbeat("hive-a", [worker("a", model="qwen-7b", cpu_pct=42.0)])
    async with open_stream(client, queen) as stream:
        assert isinstance(await stream.next(), SnapshotEvent)
        await post_heartbeat(client, queen, sent)
        event = await stream.next()
    assert isinstance(event, HiveTelemetryEvent)
    assert event.hive_id == "hive-a"
    assert event.timestamp == sent.timestamp
    assert event.workers == sent.workers


async def test_stream_handles_multiple_clients(nursery, client):
    queen = await start_queen(nursery, **QUIET)
    received: dict[int, list[str]] = {}

    async def listen(n: int, ready: trio.Event) -> None:
        async with open_stream(client, queen) as stream:
            await stream.next("snapshot")
            ready.set()
            received[n] = [(await stream.next("hive_telemetry")).hive_id for _ in range(5)]

    async with trio.open_nursery() as clients:
        for n in range(20):
            ready = trio.Event()
            clients.start_soon(listen, n, ready)
            await ready.wait()
        assert queen.broadcaster.client_count == 20
        for i in range(5):
            await post_heartbeat(client, queen, heartbeat(f"hive-{i}"))
    assert received == {n: [f"hive-{i}" for i in range(5)] for n in range(20)}


@pytest.mark.parametrize("bound", [{"client_buffer": 4},
                                   {"client_buffer": 1024, "client_buffer_bytes": 65536}],
                         ids=["events", "bytes"])
async def test_stream_handles_broadcast_lag(nursery, client, bound):
    """A client that stops reading falls behind its buffer (4 events; or 64 KiB, about three of
    these ~20 KB events, with room for 1,024 of them): when it reads again it gets a ``lagged``
    notice with the count it missed and a snapshot of the current fleet, not the backlog. (Its
    socket's receive buffer is made tiny so the kernel cannot absorb the lag.)"""
    queen = await start_queen(nursery, stream={**bound, "queen_interval_s": 3600,
                                               "keepalive_s": 3600})
    async with small_window_client() as slow, open_stream(slow, queen) as stream:
        await stream.next("snapshot")
        for round_ in range(150):  # about 3 MB of events while the client reads nothing
            await post_heartbeat(client, queen, fleet_heartbeat("hive-a", 100 - round_ % 50))
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("last")]))
        lagged = await stream.next("lagged", timeout=10)
        snapshot = await stream.next(timeout=10)
    assert isinstance(lagged, LaggedEvent) and lagged.dropped > 0
    assert isinstance(snapshot, SnapshotEvent)
    assert [w.instance for w in snapshot.hives[0].workers] == ["last"]


async def test_stream_slow_client_does_not_hold_up_others(nursery, client):
    """While a stalled client is attached, a reading client gets every event in order and every
    heartbeat is accepted."""
    queen = await start_queen(nursery, stream={"client_buffer": 4, "queen_interval_s": 3600,
                                               "keepalive_s": 3600})
    got: list[int] = []

    async def read_all(ready: trio.Event) -> None:
        async with open_stream(client, queen) as stream:
            await stream.next("snapshot")
            ready.set()
            while len(got) < 150:
                event = await stream.next("hive_telemetry", timeout=10)
                got.append(len(event.workers))

    async with small_window_client() as slow, open_stream(slow, queen) as stalled:
        await stalled.next("snapshot")
        async with trio.open_nursery() as readers:
            ready = trio.Event()
            readers.start_soon(read_all, ready)
            await ready.wait()
            for round_ in range(150):
                await post_heartbeat(client, queen, fleet_heartbeat("hive-a", 100 - round_ % 50))
        # the reader is gone (noticed at once); the stalled client is still attached
        await wait_until(lambda: queen.broadcaster.client_count == 1)
    assert got == [100 - round_ % 50 for round_ in range(150)]


async def test_stream_handles_client_disconnect(nursery, client):
    """A client that closes its connection is dropped at once, with no event or keep-alive
    written to notice it (hypercorn issue 210: under trio an app may never hear of it)."""
    queen = await start_queen(nursery, **QUIET)
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        assert queen.broadcaster.client_count == 1
    await wait_until(lambda: queen.broadcaster.client_count == 0, timeout=2)

    # and a client whose socket is reset (SO_LINGER 0: RST, no FIN), as a killed process may
    host, port = url_of(queen).removeprefix("http://").rsplit(":", 1)
    raw = trio.socket.socket()
    await raw.connect((host, int(port)))
    await raw.send(f"GET {STREAM_PATH} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"snapshot" not in data:
        data += await raw.recv(65536)
    assert queen.broadcaster.client_count == 1
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()
    await wait_until(lambda: queen.broadcaster.client_count == 0, timeout=2)

    async with open_stream(client, queen) as stream:  # the queen serves on as before
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-a"))
        assert (await stream.next()).hive_id == "hive-a"


async def test_stream_event_format(nursery, client):
    """Wire format: ``event: heartbeat``, increasing ids, one JSON ``data`` line, a reconnect
    delay on the first event; the original event shapes key for key."""
    queen = await start_queen(nursery, stream={"queen_interval_s": 0.05, "keepalive_s": 3600})
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    async with client.stream("GET", f"{url_of(queen)}{STREAM_PATH}") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        events: list[dict[str, str]] = []
        fields: dict[str, str] = {}
        with trio.fail_after(5):
            async for line in response.aiter_lines():
                if line == "":
                    events.append(fields)
                    fields = {}
                    if len(events) == 2:
                        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
                    if any(json.loads(e["data"])["type"] == "hive_telemetry" for e in events):
                        break
                    continue
                name, _, value = line.partition(": ")
                assert name not in fields, f"repeated field {name!r} in one event"
                fields[name] = value
    assert all(e["event"] == "heartbeat" for e in events)
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[0]["retry"] == "1000"
    payloads = [json.loads(e["data"]) for e in events]
    assert payloads[0]["type"] == "snapshot"
    queen_event = next(p for p in payloads if p["type"] == "queen")
    assert set(queen_event) == {"type", "workers_online", "workers_available", "hives_online",
                                "hives_available", "worker_ids", "hive_ids", "timestamp",
                                "summary"}  # added: the fleet's totals (FleetSummary)
    assert queen_event["summary"]["workers_total"] == queen_event["workers_online"]
    telemetry = next(p for p in payloads if p["type"] == "hive_telemetry")
    assert set(telemetry) == {"type", "hive_id", "timestamp", "workers",  # the original's
                              "capabilities", "health_status", "idle"}  # added: GPUs and their health
    assert set(telemetry["workers"][0]) >= {
        "pid", "group", "instance", "cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s", "uptime_s",
        "gpu_util_pct", "vram_mb", "total_vram_mb", "model"}


async def test_stream_frequency(autojump_clock):
    """The fleet summary goes out every ``queen_interval_s`` on the queen's clock, without drift.
    A whole queen runs under trio's MockClock; its stream is read in-process, so virtual time
    decides the schedule and the test takes milliseconds."""
    queen = QueenServer()  # default interval: 2.5 s
    stamps: list[float] = []
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(lambda: queen.run())
        async for frame in queen.fleet.stream():
            data = frame.decode().split("data: ", 1)[1].split("\r\n", 1)[0]
            if isinstance(decode_stream_event(data), QueenEvent):
                stamps.append(trio.current_time() - start)
                if len(stamps) == 4:
                    break
        nursery.cancel_scope.cancel()
    assert stamps == pytest.approx([2.5, 5.0, 7.5, 10.0])


async def test_sweep_schedule(autojump_clock):
    """Silence is judged each ``cleanup_interval_s`` on the queen's clock: a hive heard once is
    announced stale at ``stale_after_s`` and removed at ``remove_after_s``, to the tick. The fleet
    runs in-process under trio's MockClock (its registry on trio's clock), so virtual time decides
    the schedule."""
    config = parse_config({"registry": {"stale_after_s": 3, "remove_after_s": 10,
                                        "cleanup_interval_s": 1},
                           "stream": {"queen_interval_s": 3600}}, QueenConfig)
    fleet = open_fleet(config, clock=trio.current_time)
    verdicts: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(fleet.store.run)
        start = trio.current_time()
        await fleet.store.ingest(heartbeat("hive-a", [worker("a")]))
        async for frame in fleet.stream():
            event = decode_stream_event(frame.decode().split("data: ", 1)[1].split("\r\n", 1)[0])
            if isinstance(event, HiveStaleEvent | HiveRemovedEvent):
                verdicts.append((event.__struct_config__.tag, trio.current_time() - start))
                if isinstance(event, HiveRemovedEvent):
                    break
        nursery.cancel_scope.cancel()
    assert verdicts == [("hive_stale", 3.0), ("hive_removed", 10.0)]
    assert fleet.registry.hive_ids() == []


async def test_stream_with_no_hives(nursery, client):
    queen = await start_queen(nursery, stream={"queen_interval_s": 0.05, "keepalive_s": 3600})
    async with open_stream(client, queen) as stream:
        snapshot = await stream.next()
        summary = await stream.next()
    assert isinstance(snapshot, SnapshotEvent) and snapshot.hives == []
    assert isinstance(summary, QueenEvent)
    assert (summary.hives_online, summary.workers_online, summary.hive_ids) == (0, 0, [])


async def test_stream_reconnection(nursery, client):
    """A client that reconnects with Last-Event-ID gets exactly the events it missed, then the
    live stream; one without it (or with an id the queen no longer keeps) first gets a snapshot
    of the whole fleet. Ids keep increasing across connections."""
    queen = await start_queen(nursery, **QUIET)
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
        last = await stream.next_raw()
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("b")]))  # while away
    await post_heartbeat(client, queen, heartbeat("hive-c", [worker("c")]))
    async with open_stream(client, queen, headers={"Last-Event-ID": last.id}) as stream:
        missed = [await stream.next_raw(), await stream.next_raw()]
        await post_heartbeat(client, queen, heartbeat("hive-d", [worker("d")]))
        live = await stream.next_raw()
    events = [decode_stream_event(sse.data) for sse in [*missed, live]]
    assert [(type(e).__name__, e.hive_id) for e in events] == [
        ("HiveTelemetryEvent", "hive-b"), ("HiveTelemetryEvent", "hive-c"),
        ("HiveTelemetryEvent", "hive-d")]
    ids = [int(last.id)] + [int(sse.id) for sse in [*missed, live]]
    assert ids == sorted(set(ids))
    for headers in (None, {"Last-Event-ID": "1"}, {"Last-Event-ID": "not-an-id"}):
        async with open_stream(client, queen, headers=headers) as stream:
            first = await stream.next_raw()
        snapshot = decode_stream_event(first.data)
        assert isinstance(snapshot, SnapshotEvent)
        assert [h.hive.id for h in snapshot.hives] == ["hive-a", "hive-b", "hive-c", "hive-d"]
        assert int(first.id) == ids[-1]


async def test_an_event_nobody_heard_is_replayed_as_a_listener_would_have_got_it(nursery, client):
    """With no client listening the queen keeps a heartbeat, not its event (building events
    nobody reads cost the fleet ~4 % of a frame); a client resuming over it gets the very event
    a listening client got for the same heartbeat: the idle verdict, the workers, the GPUs."""
    queen = await start_queen(nursery, **QUIET)
    sent = heartbeat("hive-a", [worker("idle"), worker("busy", gpu_util_pct=90.0, gpu_indices=[0]),
                                worker("down", state=WorkerState.BACKOFF)],
                     [gpu(0, total_gib=80, used_gib=40, util_pct=90.0)])
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-z"))
        mark = await stream.next_raw()
        await post_heartbeat(client, queen, sent)
        heard = await stream.next_raw()
    await post_heartbeat(client, queen, sent)  # nobody listens
    async with open_stream(client, queen, headers={"Last-Event-ID": heard.id}) as stream:
        replayed = await stream.next_raw()
    assert int(replayed.id) > int(heard.id) > int(mark.id)
    live, kept = decode_stream_event(heard.data), decode_stream_event(replayed.data)
    assert isinstance(kept, HiveTelemetryEvent) and kept.idle == ["llm/idle"]
    assert kept == live
    assert json.loads(replayed.data) == json.loads(heard.data)


async def test_replay_is_bounded_in_bytes_too(nursery, client):
    """The events kept for resuming clients are bounded by their JSON bytes as well as their
    count (``stream.replay_bytes``), so one hive's big heartbeats cannot pin a thousand times
    ``http.max_body_bytes``: a client that missed more than the bytes kept gets a snapshot,
    one that missed only what is kept resumes."""
    big = [worker(f"w{n}") for n in range(100)]
    size = len(encode(heartbeat("hive-a", big)))  # about the body each post sends
    queen = await start_queen(nursery, stream={**QUIET["stream"],
                                               "replay_bytes": int(2.5 * size)})
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-a", big))
        first = await stream.next_raw()
        await post_heartbeat(client, queen, heartbeat("hive-a", big))
        second = await stream.next_raw()
        for _ in range(2):
            await post_heartbeat(client, queen, heartbeat("hive-a", big))
            await stream.next_raw()
    # kept: the last two heartbeats (2.5 x size); the second's successors are both there
    async with open_stream(client, queen, headers={"Last-Event-ID": second.id}) as stream:
        resumed = [decode_stream_event((await stream.next_raw()).data) for _ in range(2)]
    assert [type(e).__name__ for e in resumed] == ["HiveTelemetryEvent"] * 2
    # the first's successors are not all kept any more: a snapshot, never a gap
    async with open_stream(client, queen, headers={"Last-Event-ID": first.id}) as stream:
        assert isinstance(decode_stream_event((await stream.next_raw()).data), SnapshotEvent)


async def test_stream_sends_keepalive_comments(nursery, client):
    queen = await start_queen(nursery, stream={"queen_interval_s": 3600, "keepalive_s": 0.05})
    async with client.stream("GET", f"{url_of(queen)}{STREAM_PATH}") as response:
        with trio.fail_after(5):
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    break


async def test_stream_announces_stale_and_removed_hives(nursery, client):
    queen = await start_queen(nursery, registry={"stale_after_s": 0.2, "remove_after_s": 0.4,
                                                 "cleanup_interval_s": 0.02}, **QUIET)
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a"), worker("b")]))
        stale = await stream.next("hive_stale")
        removed = await stream.next("hive_removed")
    assert isinstance(stale, HiveStaleEvent) and stale.hive_id == "hive-a"
    assert stale.silent_s >= 0.2
    assert isinstance(removed, HiveRemovedEvent)
    assert removed.worker_ids == ["hive-a/llm/a", "hive-a/llm/b"]
    assert queen.registry.hive_ids() == []


async def test_stream_refuses_clients_past_the_limit(nursery, client):
    queen = await start_queen(nursery, stream={"max_clients": 2, "queen_interval_s": 3600})
    async with open_stream(client, queen) as one, open_stream(client, queen) as two:
        await one.next()
        await two.next()
        response = await client.get(f"{url_of(queen)}{STREAM_PATH}")
    assert response.status_code == 503
    assert "max_clients: 2" in response.json()["message"]


async def test_stream_shutdown_with_clients_attached(nursery, client):
    """stop() with reading clients attached ends their streams and the server at once, well
    inside the grace period that requests in flight would get."""
    queen = await start_queen(nursery, http={"shutdown_grace_s": 30})
    ended: list[int] = []

    async def listen(n: int, ready: trio.Event) -> None:
        async with open_stream(client, queen) as stream:
            await stream.next("snapshot")
            ready.set()
            await stream.rest()
        ended.append(n)

    async with trio.open_nursery() as clients:
        for n in range(5):
            ready = trio.Event()
            clients.start_soon(listen, n, ready)
            await ready.wait()
        queen.stop()
        with trio.fail_after(5):  # far less than shutdown_grace_s: nothing waits for the grace
            await queen.stopped.wait()
    assert sorted(ended) == list(range(5))


async def test_stream_drops_a_stalled_client(nursery, client):
    """A client that takes no data for http.stall_timeout_s is disconnected (the kernel's
    TCP_USER_TIMEOUT on the queen's sockets): its slot and buffer are freed."""
    queen = await start_queen(nursery, http={"stall_timeout_s": 0.5},
                              stream={"client_buffer": 2, "queen_interval_s": 3600})
    async with small_window_client() as slow, open_stream(slow, queen) as stalled:
        await stalled.next("snapshot")
        for _ in range(60):
            await post_heartbeat(client, queen, fleet_heartbeat("hive-a", 100))
        await wait_until(lambda: queen.broadcaster.client_count == 0, timeout=10)
    await post_heartbeat(client, queen, heartbeat("hive-a"))


async def test_stream_shutdown_with_a_stalled_client(nursery, client):
    """A client that stopped reading holds hypercorn's (shielded) send, so its response cannot
    finish; the stall timeout cuts it off and the queen still stops."""
    queen = await start_queen(nursery, http={"shutdown_grace_s": 0.2, "stall_timeout_s": 1},
                              stream={"client_buffer": 2})
    async with small_window_client() as slow, open_stream(slow, queen) as stalled:
        await stalled.next("snapshot")
        for _ in range(60):
            await post_heartbeat(client, queen, fleet_heartbeat("hive-a", 100))
        queen.stop()
        with trio.fail_after(5):
            await queen.stopped.wait()


async def test_backlog_is_written_in_bounded_pieces():
    """A backlog goes out in pieces of at most ``write_chunk_bytes`` (frames joined up to it), a
    larger frame alone and uncopied; past ``client_buffer_bytes`` the backlog is let go at once
    and the client resyncs."""
    subscription = Subscription(100, 8000, 1024)
    frames = [bytes([65 + i]) * 300 for i in range(10)]
    big = b"B" * 5000
    for frame in [*frames, big]:
        subscription.offer(frame)
    assert subscription.backlog_bytes == 8000
    subscription.close()
    pieces = [piece async for piece in subscription.frames(lambda dropped: iter(()))]
    assert all(len(piece) <= 1024 for piece in pieces[:-1])
    assert b"".join(pieces[:-1]) == b"".join(frames) and pieces[-1] is big
    assert subscription.backlog_bytes == 0

    lagging = Subscription(100, 8000, 1024)
    for frame in [*frames, big, b"x"]:
        lagging.offer(frame)
    assert (lagging.dropped, lagging.backlog_bytes) == (12, 0)
    lagging.close()
    resynced = [piece async for piece in lagging.frames(lambda dropped: iter([b"%d" % dropped]))]
    assert resynced == [b"12"]
