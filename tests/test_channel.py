"""The queen's end of a hive's channel, spoken to by a real WebSocket client (httpx-ws, as the
hive uses it) against a real queen on 127.0.0.1, on the channel the connection serves itself
(tests/test_rawchannel.py compares it with the app's): a snapshot then deltas give the very registry
that POSTs of the whole heartbeats give; a gap forces a snapshot; the upgrade is authenticated as
a POST; hostile frames get an error naming the problem and corrupt nothing."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
import trio
from httpx_ws import WebSocketDisconnect, WebSocketUpgradeError, aconnect_ws

from rbee.contract import (
    ChannelAck,
    ChannelDelta,
    ChannelError,
    ChannelResync,
    ChannelSnapshot,
    OperationalStatus,
    apply_delta,
    decode_hive_frame,
    decode_queen_frame,
    encode_frame,
    paths,
    utc_now,
)
from rbee.credentials import new_credential
from rbee.hive.channel import FrameMaker
from rbee.http.auth import bearer, hive_basic
from rbee.queen.channel import HiveLink, OpenChannels

from .builders import fleet_heartbeat, gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of, wait_until

TOKEN = "t" * 32


@asynccontextmanager
async def channel(queen, headers=None):
    async with httpx.AsyncClient(headers=headers or {}) as client, \
            aconnect_ws(url_of(queen) + paths.CHANNEL, client) as websocket:
        # answered by the connection itself (rbee/http/rawchannel.py): hypercorn's 101 has a date
        assert "date" not in websocket.response.headers
        yield Talk(websocket)


class Talk:
    """Send one frame, read its one answer."""

    def __init__(self, websocket) -> None:
        self.websocket = websocket

    async def __call__(self, frame) -> object:
        data = frame if isinstance(frame, bytes) else encode_frame(frame)
        await self.websocket.send_bytes(data)
        return decode_queen_frame(await self.websocket.receive_bytes())


def beats():
    """A hive's life in heartbeats: figures change, a worker comes, one goes, a GPU is busy, the
    hive turns busy, a GPU disappears."""
    first = fleet_heartbeat("hive-a", 8)
    yield first
    second = msgspec.structs.replace(first, timestamp=utc_now(), workers=[
        msgspec.structs.replace(w, cpu_pct=w.cpu_pct + 1) if i % 3 == 0 else w
        for i, w in enumerate(first.workers)])
    yield second
    third = msgspec.structs.replace(second, timestamp=utc_now(), workers=[
        *second.workers[1:], worker("late", pid=777, gpu_indices=[7], vram_mb=4096)])
    yield third
    gpus = list(third.capabilities)
    gpus[3] = gpu(3, total_gib=80, used_gib=79, util_pct=100.0)
    fourth = msgspec.structs.replace(third, timestamp=utc_now(), capabilities=gpus,
                                     hive=msgspec.structs.replace(
                                         third.hive, operational_status=OperationalStatus.BUSY))
    yield fourth
    yield msgspec.structs.replace(fourth, timestamp=utc_now(), capabilities=gpus[:-1])


async def test_snapshot_then_deltas_give_the_registry_a_post_gives(nursery):
    by_channel = await start_queen(nursery)
    by_post = await start_queen(nursery)
    maker = FrameMaker()
    kinds = []
    async with channel(by_channel) as talk, httpx.AsyncClient() as client:
        for beat in beats():
            data = maker.frame(beat, snapshot=maker.seq < 0)
            kinds.append(type(decode_hive_frame(data)).__name__)
            assert await talk(data) == ChannelAck(maker.seq)
            await post_heartbeat(client, by_post, beat)
            states = [queen.registry.get_hive("hive-a") for queen in (by_channel, by_post)]
            for state in states:
                state.silent_s = 0.0  # by each queen's clock
            assert states[0] == states[1]
            assert (await client.get(url_of(by_channel) + "/v1/workers")).json() \
                == (await client.get(url_of(by_post) + "/v1/workers")).json()
    assert kinds == ["ChannelSnapshot"] + ["ChannelDelta"] * 4
    assert by_channel.metrics.received._value.get() == 5


async def test_a_delta_carries_only_what_changed():
    """The point of the channel: a beat where two workers' figures moved is two workers."""
    first, second, *_ = beats()
    maker = FrameMaker()
    maker.frame(first, snapshot=True)
    delta = decode_hive_frame(maker.frame(second, snapshot=False))
    assert type(delta) is ChannelDelta
    assert [w.instance for w in delta.workers] == ["worker-000", "worker-003", "worker-006"]
    assert delta.gpus == [] and delta.gone == [] and delta.hive is None
    assert apply_delta(first, delta) == second


def test_a_hive_whose_lists_changed_order_sends_a_snapshot():
    """A delta keeps the lists' order (changed items in place, new ones appended); any other
    order is sent whole, so the queen's lists are always the hive's."""
    first, *_ = beats()
    maker = FrameMaker()
    maker.frame(first, snapshot=True)
    shuffled = msgspec.structs.replace(first, workers=first.workers[::-1])
    assert type(decode_hive_frame(maker.frame(shuffled, snapshot=False))) is ChannelSnapshot
    assert maker.snapshot_seq == maker.seq == 1
    fewer = msgspec.structs.replace(shuffled, workers=shuffled.workers[1:])
    delta = decode_hive_frame(maker.frame(fewer, snapshot=False))
    assert type(delta) is ChannelDelta and delta.gone == [("llm", "worker-007")]
    assert apply_delta(shuffled, delta) == fewer


async def test_a_gap_forces_a_snapshot_and_nothing_is_applied(nursery):
    queen = await start_queen(nursery)
    first, _, third, *_ = beats()
    async with channel(queen) as talk:
        answer = await talk(ChannelDelta(seq=0, timestamp=utc_now()))
        assert answer == ChannelResync(0, "no snapshot taken on this channel yet")
        assert queen.registry.hive_ids() == []
        assert await talk(ChannelSnapshot(seq=1, heartbeat=first)) == ChannelAck(1)
        skipped = ChannelDelta(seq=3, timestamp=utc_now(), gone=[("llm", "worker-000")])
        assert await talk(skipped) == ChannelResync(
            3, "delta 3 does not follow frame 1, the last taken")
        assert len(queen.registry.get_workers("hive-a")) == 8  # the gap's delta: not applied
        assert await talk(ChannelSnapshot(seq=4, heartbeat=third)) == ChannelAck(4)
        assert await talk(ChannelDelta(seq=5, timestamp=utc_now(),
                                       gone=[("llm", "late")])) == ChannelAck(5)
    assert [w.instance for w in queen.registry.get_workers("hive-a")] == [
        w.instance for w in third.workers[:-1]]
    refused = queen.metrics.refused.labels("out_of_sequence")._value.get()
    assert refused == 2


@pytest.mark.parametrize("frame, problem", [
    (b"\xc1", "invalid channel frame: not a msgpack frame"),
    (encode_frame(ChannelAck(3)), "invalid channel frame: Invalid value 'ack' - at `$.type`"),
    (msgspec.msgpack.encode({"type": "snapshot", "seq": 1, "heartbeat": {"hive": 3}}),
     "invalid channel frame: Expected `object`, got `int` - at `$.heartbeat.hive`"),
    (msgspec.msgpack.encode({"type": "delta", "seq": 1, "timestamp": utc_now(),
                             "gone": [["llm", "nobody"]]}),
     "invalid delta: worker 'llm/nobody' is gone but was not there - at `$.gone`"),
    (ChannelDelta(seq=1, timestamp=utc_now(), workers=[worker("bad name!")]),
     "'bad name!' is not a group or instance name"),
    (ChannelDelta(seq=1, timestamp=utc_now(), hive=heartbeat("hive-b").hive),
     "invalid delta: hive 'hive-b' on the channel of hive 'hive-a'"),
    (ChannelSnapshot(seq=1, heartbeat=heartbeat("hive-b")),
     "invalid snapshot: hive 'hive-b' on the channel of hive 'hive-a'"),
    (b"\x00" * 5000, "frame of 5000 bytes, more than http.max_body_bytes (4096)"),
], ids=["not-msgpack", "ack-from-hive", "hive-not-object", "gone-unknown", "bad-name",
        "delta-other-hive", "snapshot-other-hive", "too-big"])
async def test_a_hostile_frame_gets_a_clear_error_and_corrupts_nothing(nursery, frame, problem):
    queen = await start_queen(nursery, http={"max_body_bytes": 4096})
    first = heartbeat("hive-a", [worker("w0"), worker("w1")])
    async with channel(queen) as talk:
        assert await talk(ChannelSnapshot(seq=0, heartbeat=first)) == ChannelAck(0)
        answer = await talk(frame)
        assert type(answer) is ChannelError
        assert answer.status in (400, 413)
        assert problem in answer.message
        assert [w.instance for w in queen.registry.get_workers("hive-a")] == ["w0", "w1"]
        # the channel's state is the last frame taken: a snapshot resumes, then deltas apply
        assert await talk(ChannelSnapshot(seq=2, heartbeat=first)) == ChannelAck(2)
        assert await talk(ChannelDelta(seq=3, timestamp=utc_now(),
                                       gone=[("llm", "w0")])) == ChannelAck(3)
        await talk.websocket.send_text("hello")
        answer = decode_queen_frame(await talk.websocket.receive_bytes())
        assert "a text frame: the channel takes binary frames of msgpack" in answer.message
    assert [w.instance for w in queen.registry.get_workers("hive-a")] == ["w1"]


@pytest.fixture
async def guarded(nursery, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    secret, line = new_credential("hive-a")
    credentials = tmp_path / "credentials"
    credentials.write_text(line + "\n")
    queen = await start_queen(nursery, auth_token_file=str(token_file),
                              hive_credentials_file=str(credentials))
    return queen, secret


@pytest.mark.parametrize("headers", [{}, bearer("w" * 32), hive_basic("hive-a", "wrong")])
async def test_the_upgrade_is_refused_without_the_right_token(guarded, headers):
    queen, _ = guarded
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with channel(queen, headers):
            pass
    assert refused.value.response.status_code == 401
    assert queen.metrics.refused.labels("unauthorized")._value.get() == 1
    assert queen.metrics.channels._value.get() == 0


async def test_a_hive_credential_acts_only_as_itself(guarded):
    queen, secret = guarded
    async with channel(queen, hive_basic("hive-a", secret)) as talk:
        answer = await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-z")))
        assert queen.metrics.channels._value.get() == 1
        assert answer == ChannelError(seq=0, status=403, message=(
            "the credential of hive 'hive-a' cannot post as hive 'hive-z'"))
        assert await talk(ChannelSnapshot(seq=1, heartbeat=heartbeat("hive-a"))) == ChannelAck(1)
    async with channel(queen, bearer(TOKEN)) as talk:  # the shared token: any hive
        assert await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-z"))) == ChannelAck(0)
    assert queen.registry.hive_ids() == ["hive-a", "hive-z"]


async def test_a_goodbye_on_the_channel_removes_the_hive(nursery):
    queen = await start_queen(nursery)
    async with channel(queen) as talk:
        assert await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
        bye = heartbeat("hive-a", status=OperationalStatus.STOPPED)
        assert await talk(ChannelSnapshot(seq=1, heartbeat=bye)) == ChannelAck(1)
        assert queen.registry.hive_ids() == []
        answer = await talk(ChannelDelta(seq=2, timestamp=utc_now()))
        assert type(answer) is ChannelResync  # nothing to apply a delta to any more


async def test_admission_refusal_carries_retry_after(nursery):
    queen = await start_queen(nursery, registry={"new_hives_per_s": 1, "new_hives_burst": 1})
    async with channel(queen) as talk:
        assert await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
    async with channel(queen) as talk:
        answer = await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-b")))
    assert type(answer) is ChannelError and answer.status == 429
    assert answer.retry_after_s is not None and answer.retry_after_s >= 1


async def test_a_queen_with_the_channel_off_refuses_the_upgrade(nursery):
    queen = await start_queen(nursery, channel_enabled=False)
    with pytest.raises(WebSocketUpgradeError) as refused:
        async with channel(queen):
            pass
    assert refused.value.response.status_code == 403


async def test_a_stopping_queen_closes_its_channels_at_once(nursery):
    """Not after ``http.shutdown_grace_s`` (2 s) as a request in flight: at once, with 1001
    (going away), so the hive reconnects or fails over without waiting."""
    queen = await start_queen(nursery)
    async with channel(queen) as talk:
        assert await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
        queen.stop()
        with trio.fail_after(1), pytest.raises(WebSocketDisconnect) as closed:
            await talk.websocket.receive_bytes()
        assert (closed.value.code, closed.value.reason) == (1001, "the queen is stopping")
        with trio.fail_after(1):
            await queen.stopped.wait()
    assert queen.metrics.channels._value.get() == 0


class _Socket:
    """A session's socket that never brings a frame, and records how it was closed."""

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    async def receive(self) -> None:
        await trio.sleep_forever()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def _silent_session(channels: OpenChannels, socket: _Socket, link: HiveLink) -> float:
    """A session as ``ChannelService.serve`` runs it, on ``socket``: when it was closed."""
    with trio.CancelScope() as scope:
        channels.opened(scope, link)
        try:
            await socket.receive()
        finally:
            channels.gone(scope)
    await channels.farewell(socket, link)
    return trio.current_time()


async def test_the_reaper_closes_a_silent_channel_within_a_quarter_of_the_timeout(mock_clock):
    """One task closes silent channels (no deadline moved per frame): between ``idle_s`` and
    1.25 times it after the last frame, with 1000 and the key named; a channel whose frame is
    being answered is left open however long the answer takes."""
    channels = OpenChannels(grace_s=1.0, idle_s=8.0)
    silent, answering = _Socket(), _Socket()
    silent_link, answering_link = HiveLink(None, None, 0, None), HiveLink(None, None, 0, None)
    closed_at: list[float] = []

    async def session(socket: _Socket, link: HiveLink) -> None:
        closed_at.append(await _silent_session(channels, socket, link))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(channels.reap)
        opened_at = trio.current_time()
        nursery.start_soon(session, silent, silent_link)
        nursery.start_soon(session, answering, answering_link)
        while len(channels) < 2:  # both sessions opened (trio runs new tasks in any order)
            await trio.sleep(0)
        answering_link.heard_at = math.inf  # as while its frame is answered
        while silent.closed is None:
            await trio.sleep(0.5)
        await trio.sleep(60)
        assert answering.closed is None and len(channels) == 1
        nursery.cancel_scope.cancel()
    assert silent.closed == (1000, "no frame for http.keep_alive_timeout_s (8s)")
    assert 8.0 <= closed_at[0] - opened_at <= 10.0


async def test_a_stopping_queen_says_so_to_a_silent_channel_too(mock_clock):
    channels = OpenChannels(grace_s=1.0, idle_s=8.0)
    socket, link = _Socket(), HiveLink(None, None, 0, None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_silent_session, channels, socket, link)
        await trio.sleep(1)
        channels.close()
    assert socket.closed == (1001, "the queen is stopping") and len(channels) == 0


async def test_a_channel_without_frames_is_closed_after_the_keep_alive_timeout(nursery):
    """A hive that vanished without a word (power, network) would hold its channel forever."""
    queen = await start_queen(nursery, http={"keep_alive_timeout_s": 0.3})
    async with channel(queen) as talk:
        assert await talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
        with trio.fail_after(2), pytest.raises(WebSocketDisconnect) as closed:
            await talk.websocket.receive_bytes()
    assert closed.value.reason == "no frame for http.keep_alive_timeout_s (0.3s)"
    await wait_until(lambda: queen.metrics.channels._value.get() == 0)
