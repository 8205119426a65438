"""hypercorn's limits as ``rbee/http/serving.py`` sets them from the config, against a real queen."""

from __future__ import annotations

import httpx
import pytest
from httpx_ws import WebSocketDisconnect, aconnect_ws

from rbee.contract import (
    ChannelAck,
    ChannelError,
    ChannelSnapshot,
    decode_queen_frame,
    encode_frame,
    paths,
)
from rbee.http.serving import WS_MESSAGE_BODIES

from .builders import heartbeat, worker
from .queenkit import start_queen, url_of

MAX_BODY = 4096


async def test_a_channel_frame_is_buffered_only_up_to_the_body_limit(nursery):
    """A frame a little over ``http.max_body_bytes`` gets the channel's clear 413; one over
    twice the limit is never buffered whole (hypercorn's default is 16 MiB): the connection is
    closed with 1009 (message too big), and the queen still holds what it took before."""
    queen = await start_queen(nursery, http={"max_body_bytes": MAX_BODY})
    first = heartbeat("hive-a", [worker("w0")])
    async with httpx.AsyncClient() as client, \
            aconnect_ws(url_of(queen) + paths.CHANNEL, client) as websocket:
        await websocket.send_bytes(encode_frame(ChannelSnapshot(seq=0, heartbeat=first)))
        assert decode_queen_frame(await websocket.receive_bytes()) == ChannelAck(0)
        await websocket.send_bytes(b"\x00" * (MAX_BODY + 100))
        answer = decode_queen_frame(await websocket.receive_bytes())
        assert type(answer) is ChannelError and answer.status == 413, answer
        await websocket.send_bytes(b"\x00" * (WS_MESSAGE_BODIES * MAX_BODY + 1))
        with pytest.raises(WebSocketDisconnect) as closed:
            await websocket.receive_bytes()
        assert closed.value.code == 1009
    assert [w.instance for w in queen.registry.get_workers("hive-a")] == ["w0"]
