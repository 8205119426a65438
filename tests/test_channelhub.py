"""The channel hub (rbee/queen/channelhub.py) in a real queen on 127.0.0.1, spoken to over raw
sockets: it answers the plain channels' whole binary frames itself, hands a channel back to its
own task for anything else (ping, fragments, close) and takes it again after, and an answer the
kernel does not take at once is sent by the channel's task, every answer in order. A queen on a
shared store (its writes wait for Redis) has no hub: tests/test_redis_store.py's channels run
each on its own task."""

from __future__ import annotations

import socket

import trio

from rbee.contract import (
    ChannelAck,
    ChannelDelta,
    ChannelResync,
    ChannelSnapshot,
    decode_queen_frame,
    encode_frame,
    utc_now,
)
from rbee.queen.channelhub import Back

from .builders import heartbeat, worker
from .queenkit import start_queen, wait_until
from .test_rawchannel import BINARY, CLOSE, CONTINUATION, PING, PONG, Ws, client_frame, upgrade


def snapshot(seq: int = 0) -> ChannelSnapshot:
    return ChannelSnapshot(seq=seq, heartbeat=heartbeat("hub-hive", [worker("a")]))


async def test_the_hub_answers_whole_frames_and_hands_back_the_rest(nursery):
    queen = await start_queen(nursery)
    hub = queen.hub
    ws = await _opened(queen)
    assert type(await ws.talk(snapshot())) is ChannelAck
    assert type(await ws.talk(ChannelDelta(seq=1, timestamp=utc_now()))) is ChannelAck
    assert hub.answered == 2 and hub.handed_back[Back.FRAME] == 0

    await ws.send(client_frame(PING, b"still there?"))  # the channel's own task answers it
    assert await ws.frame() == (PONG, b"still there?")
    assert type(await ws.talk(ChannelDelta(seq=2, timestamp=utc_now()))) is ChannelAck
    assert hub.handed_back[Back.FRAME] == 1

    whole = encode_frame(ChannelDelta(seq=3, timestamp=utc_now()))  # in two fragments
    await ws.send(client_frame(BINARY, whole[:5], final=False),
                  client_frame(CONTINUATION, whole[5:]))
    opcode, _ = await ws.frame()
    assert opcode == BINARY and hub.handed_back[Back.FRAME] == 2
    answered = hub.answered
    assert type(await ws.talk(ChannelDelta(seq=4, timestamp=utc_now()))) is ChannelAck
    assert hub.answered == answered + 1  # parked again after the fragments

    await ws.send(client_frame(CLOSE, b"\x03\xe8bye"))
    assert await ws.frame() == (CLOSE, b"\x03\xe8")
    assert hub.handed_back[Back.FRAME] == 3
    await wait_until(lambda: len(queen.channels) == 0)
    assert queen.registry.get_hive("hub-hive").hive.id == "hub-hive"


async def test_answers_the_kernel_does_not_take_at_once_arrive_in_order(nursery):
    """A hive that sends 3,000 frames before reading any answer (a receive buffer of 4 KB): the
    hub's write falls short, the channel's task sends the rest when the hive reads, then parks
    again; each frame gets its one answer, in order."""
    queen = await start_queen(nursery)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window
    await sock.connect(("127.0.0.1", int(queen.urls[0].rsplit(":", 1)[1])))
    ws = Ws(sock)
    await ws.send(upgrade("raw"))
    assert (await ws.head())[0] == 101
    count = 3000
    # deltas before any snapshot: each answered with a resync naming its seq (~60 bytes)
    await ws.send(*(client_frame(BINARY, encode_frame(ChannelDelta(seq=n, timestamp=utc_now())))
                    for n in range(1, count + 1)))
    await wait_until(lambda: queen.hub.handed_back[Back.WRITE] >= 1)
    seqs = []
    for _ in range(count):
        opcode, payload = await ws.frame()
        assert opcode == BINARY
        seqs.append(_resynced(payload))
    assert seqs == list(range(1, count + 1))
    assert type(await ws.talk(snapshot())) is ChannelAck
    answered = queen.hub.answered
    assert type(await ws.talk(ChannelDelta(seq=1, timestamp=utc_now()))) is ChannelAck
    assert queen.hub.answered == answered + 1  # the hub took the channel again
    sock.close()


def _resynced(payload: bytes) -> int:
    answer = decode_queen_frame(payload)
    assert type(answer) is ChannelResync, answer
    return answer.seq


async def _opened(queen) -> Ws:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", int(queen.urls[0].rsplit(":", 1)[1])))
    ws = Ws(sock)
    await ws.send(upgrade("raw"))
    assert (await ws.head())[0] == 101
    return ws


async def test_a_frame_that_fails_unexpectedly_ends_its_channel_alone(nursery, monkeypatch, caplog):
    """A bug in taking one frame (here, forced) closes that channel, logged; the hub and the
    other channels go on."""
    queen = await start_queen(nursery)
    other = await _opened(queen)
    assert type(await other.talk(snapshot())) is ChannelAck
    failing = await _opened(queen)

    def broken(self, data):
        raise RuntimeError("a bug")

    monkeypatch.setattr("rbee.queen.channel.HiveLink.take_now", broken)
    await failing.send(client_frame(BINARY, encode_frame(snapshot())))
    assert await failing.frame() is None  # closed, no answer
    assert "a frame failed; the channel is closed" in caplog.text
    monkeypatch.undo()
    assert type(await other.talk(ChannelDelta(seq=1, timestamp=utc_now()))) is ChannelAck
