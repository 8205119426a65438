"""Several queens and the hives' channels, on a real Redis: the stream carries a channel's deltas,
and every queen's mirror applies them to its copy of the hive, as the queen that took them did.

Queens run in-process (their registries read directly); hives are real channel clients
(``httpx-ws``) sending the frames a hive's ``FrameMaker`` makes.
"""

from __future__ import annotations

import httpx
import msgspec

from rbee.config import QueenConfig, parse_config
from rbee.contract import (
    ChannelAck,
    ChannelDelta,
    ChannelError,
    HiveHeartbeat,
    HiveTelemetryEvent,
    decode_hive_frame,
    decode_stream_event,
)
from rbee.hive.channel import FrameMaker
from rbee.queen.fleet import open_fleet
from rbee.queen.redis.connection import RedisClock
from rbee.queen.redis.keys import entry_key
from rbee.queen.redis.mirror import decode_record, fields_of
from rbee.queen.redis.store import as_entries

from .queenkit import open_stream, start_queen
from .rediskit import wait_for
from .test_channel import beats, channel
from .test_redis_store import redis_server, registry  # noqa: F401 (the session's Redis)

HIVE = "hive-a"
QUIET = {"stale_after_s": 30.0, "remove_after_s": 60.0}
"""The hives of these tests send frames only when told: none is judged silent meanwhile."""


def same_hive(a, b) -> bool:
    """Whether two queens hold the same of ``HIVE`` (its silence aside: each queen's clock)."""
    states = [queen.registry.get_hive(HIVE) if queen.registry.knows(HIVE) else None
              for queen in (a, b)]
    if None in states:
        return False
    for state in states:
        state.silent_s = 0.0
    return states[0] == states[1]


async def held(a, b) -> bool:
    return same_hive(a, b)


async def stream_entries(queen) -> list[tuple[str, dict[bytes, bytes]]]:
    redis = queen.fleet.store.redis
    reply = await redis.command("XRANGE", redis.keys.stream, "-", "+")
    return [(entry_id.decode(), fields_of(fields)) for entry_id, fields in as_entries(reply)]


async def record_of(queen) -> HiveHeartbeat:
    redis = queen.fleet.store.redis
    return decode_record(await redis.command("HGET", redis.keys.hives, HIVE))


async def test_the_other_queen_applies_the_deltas(nursery, redis_server):  # noqa: F811
    """A hive on queen A's channel: its deltas go on the stream as deltas (not the whole
    heartbeat), the record in Redis stays its snapshot, and queen B holds what A holds after
    every frame."""
    settings = {"registry": registry(redis_server.url) | QUIET}
    a = await start_queen(nursery, **settings)
    b = await start_queen(nursery, **settings)
    maker = FrameMaker()
    frames = []
    life = list(beats())
    async with channel(a) as talk:
        for beat in life:
            data = maker.frame(beat, snapshot=maker.seq < 0)
            frames.append(data)
            assert await talk(data) == ChannelAck(maker.seq)
            await wait_for(lambda: held(a, b), timeout=5)
    entries = [(i, f) for i, f in await stream_entries(a) if f[b"k"] != b"ev"]
    assert [f[b"k"] for _, f in entries] == [b"hb"] + [b"dl"] * 4
    for (previous, _), (_, fields), frame in zip(entries[:-1], entries[1:], frames[1:], strict=True):
        assert fields[b"h"] == HIVE.encode() and fields[b"b"].decode() == previous
        assert msgspec.msgpack.decode(fields[b"d"], type=ChannelDelta) == decode_hive_frame(frame)
        assert len(fields[b"d"]) < len(entries[0][1][b"d"])
    assert (await record_of(a)).timestamp == life[0].timestamp  # as of the snapshot
    assert b.registry.get_workers(HIVE) == life[-1].workers
    mirror = b.fleet.store.mirror
    assert (mirror.deltas_missed, mirror.reloads) == (0, 0)


async def test_a_queen_loaded_between_snapshots_catches_up_at_the_next(nursery, redis_server):  # noqa: F811
    """Queen B starts after the hive's snapshot and two deltas: it loads the record (the
    snapshot), the next delta does not follow it, so B keeps the snapshot's state (reloading
    finds nothing newer) until the hive's next snapshot, and follows the deltas after that."""
    settings = {"registry": registry(redis_server.url) | QUIET}
    a = await start_queen(nursery, **settings)
    maker = FrameMaker()
    life = list(beats())
    async with channel(a) as talk:
        for beat in life[:3]:
            assert await talk(maker.frame(beat, snapshot=maker.seq < 0)) == ChannelAck(maker.seq)
        b = await start_queen(nursery, **settings)
        assert b.registry.get_workers(HIVE) == life[0].workers
        assert await talk(maker.frame(life[3], snapshot=False)) == ChannelAck(maker.seq)
        await wait_for(lambda: caught_up(b, a), timeout=5)
        assert (b.fleet.store.mirror.deltas_missed, b.fleet.store.mirror.reloads) == (1, 0)
        assert b.registry.get_workers(HIVE) == life[0].workers
        assert b.registry.get_hive(HIVE).capabilities == life[0].capabilities
        assert await talk(maker.frame(life[3], snapshot=True)) == ChannelAck(maker.seq)
        await wait_for(lambda: held(a, b), timeout=5)
        assert await talk(maker.frame(life[4], snapshot=False)) == ChannelAck(maker.seq)
        await wait_for(lambda: held(a, b), timeout=5)
        assert b.registry.get_hive(HIVE).capabilities == life[4].capabilities
    assert b.fleet.store.mirror.deltas_missed == 1


async def caught_up(b, a) -> bool:
    """Whether ``b``'s mirror has read the whole stream as it is now, every entry ``a`` wrote
    included (not ``a``'s own mirror's position: that one may lag behind what ``a`` wrote)."""
    redis = a.fleet.store.redis
    last = as_entries(await redis.command("XREVRANGE", redis.keys.stream, "+", "-", "COUNT", "1"))
    return entry_key(b.fleet.store.mirror.position) >= entry_key(last[0][0].decode())


async def test_a_mirror_that_missed_entries_reloads_the_hive(nursery, redis_server):  # noqa: F811
    """A mirror handed the snapshot and then, skipping a delta and the next snapshot (as a
    follower that fell further behind than the stream keeps would be), the delta after it:
    it reloads the hive's record, which is that delta's base, and applies the delta."""
    settings = {"registry": registry(redis_server.url) | QUIET}
    a = await start_queen(nursery, **settings)
    maker = FrameMaker()
    life = list(beats())
    async with channel(a) as talk:
        for beat, snapshot in zip(life[:4], [True, False, True, False], strict=True):
            assert await talk(maker.frame(beat, snapshot=snapshot)) == ChannelAck(maker.seq)
    s1, _, s2, d2 = [e for e in await stream_entries(a) if e[1][b"k"] != b"ev"]
    assert (s1[1][b"k"], s2[1][b"k"], d2[1][b"b"].decode()) == (b"hb", b"hb", s2[0])
    fleet = open_fleet(parse_config({"port": 0, **settings}, QueenConfig, "<test>"))
    mirror = fleet.store.mirror
    await fleet.store.redis.open()
    try:
        await mirror.take([s1])
        assert fleet.registry.get_workers(HIVE) == life[0].workers
        await mirror.take([d2])
        assert (mirror.deltas_missed, mirror.reloads) == (0, 1)
        assert fleet.registry.get_workers(HIVE) == life[3].workers
        assert fleet.registry.get_hive(HIVE).capabilities == life[3].capabilities
    finally:
        await fleet.store.redis.close()


def test_redis_clock_never_steps_back():
    """A sync that finds this host's estimate of Redis's clock ahead does not step the clock
    back: the registry's admission bucket runs on it, and would count a step back as spent."""
    clock = RedisClock()
    before = clock.now()
    clock.offset -= 0.5  # the next sync found Redis's clock half a second behind the estimate
    assert before <= clock.now() <= before + 0.1
    clock.offset += 0.5
    assert clock.now() >= before


async def test_a_delta_of_a_hive_redis_no_longer_holds_asks_for_a_snapshot(nursery,
                                                                          redis_server):  # noqa: F811
    """An operator removes the hive while its channel is open: its next delta has no record to
    follow in Redis, so the queen answers 409 naming why (the hive's next frame is a snapshot),
    writes nothing, and takes the snapshot after it."""
    a = await start_queen(nursery, registry=registry(redis_server.url) | QUIET)
    maker = FrameMaker()
    life = list(beats())
    async with channel(a) as talk, httpx.AsyncClient() as client:
        assert await talk(maker.frame(life[0], snapshot=True)) == ChannelAck(0)
        assert (await client.delete(f"{a.urls[0]}/v1/hives/{HIVE}")).status_code == 200
        written = len(await stream_entries(a))
        answer = await talk(maker.frame(life[1], snapshot=False))
        assert type(answer) is ChannelError and answer.status == 409, answer
        assert f"holds no record of hive {HIVE!r}" in answer.message
        assert len(await stream_entries(a)) == written
        assert not a.registry.knows(HIVE)
        assert await talk(maker.frame(life[1], snapshot=True)) == ChannelAck(2)
    assert a.registry.get_workers(HIVE) == life[1].workers


async def test_a_client_resuming_on_another_queen_gets_the_deltas_whole(nursery,
                                                                         redis_server):  # noqa: F811
    """A stream client that last got the hive's second delta resumes on queen B: it gets the
    third and fourth as whole telemetry events, their bases taken from entries before the id it
    resumes from, each with its entry id, and no snapshot."""
    settings = {"registry": registry(redis_server.url) | QUIET}
    a = await start_queen(nursery, **settings)
    b = await start_queen(nursery, **settings)
    maker = FrameMaker()
    life = list(beats())
    async with channel(a) as talk:
        for beat in life:
            assert await talk(maker.frame(beat, snapshot=maker.seq < 0)) == ChannelAck(maker.seq)
    ids = [i for i, f in await stream_entries(a) if f[b"k"] != b"ev"]
    await wait_for(lambda: caught_up(b, a), timeout=5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client, \
            open_stream(client, b, {"Last-Event-ID": ids[2]}) as stream:
        got = [await stream.next_raw() for _ in range(2)]
    assert [sse.id for sse in got] == ids[3:5]
    events = [decode_stream_event(sse.data) for sse in got]
    assert all(type(event) is HiveTelemetryEvent for event in events)
    assert [event.workers for event in events] == [life[3].workers, life[4].workers]
    assert [event.capabilities for event in events] == [life[3].capabilities,
                                                        life[4].capabilities]
