"""A real queen on 127.0.0.1 (port 0) inside the test's trio nursery, and a real SSE client.

The queen is the product's own ``QueenServer``: hypercorn's trio worker, the Starlette app, the
registry and its background tasks. The client is httpx with httpx-sse, as a UI would use.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio
from httpx_sse import ServerSentEvent, aconnect_sse

from rbee.config import QueenConfig, parse_config
from rbee.contract import STREAM_EVENT_NAME, HiveHeartbeat, StreamEvent, decode_stream_event, encode
from rbee.queen.server import QueenServer

STREAM_PATH = "/v1/heartbeats/stream"


async def start_queen(nursery: trio.Nursery, **settings: object) -> QueenServer:
    """Start a queen with ``settings`` over the defaults; it stops when the nursery is cancelled."""
    queen = QueenServer(parse_config({"port": 0, **settings}, QueenConfig, "<test>"))
    await nursery.start(queen.run)
    return queen


def url_of(queen: QueenServer | str) -> str:
    """The queen's base URL: an in-process QueenServer's, or a URL as it is."""
    return queen if isinstance(queen, str) else queen.urls[0]


async def post_heartbeat(client: httpx.AsyncClient, queen: QueenServer,
                         heartbeat: HiveHeartbeat) -> httpx.Response:
    response = await client.post(f"{url_of(queen)}/v1/hive-heartbeat", content=encode(heartbeat),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    return response


class StreamReader:
    """Reads one SSE connection event by event, decoding each into the contract's structs."""

    def __init__(self, source) -> None:
        self.source = source
        self.response: httpx.Response = source.response
        self._events = source.aiter_sse()

    async def next_raw(self, timeout: float = 5.0) -> ServerSentEvent:
        with trio.fail_after(timeout):
            return await anext(self._events)

    async def until(self, predicate, timeout: float = 5.0) -> StreamEvent:
        """The first event for which ``predicate(event)`` holds."""
        with trio.fail_after(timeout):
            while True:
                event = await self.next(timeout=timeout)
                if predicate(event):
                    return event

    async def rest(self) -> list[ServerSentEvent]:
        """Every event until the server ends the stream."""
        return [sse async for sse in self._events]

    async def next(self, *types: str, timeout: float = 5.0) -> StreamEvent:
        """The next event, skipping those whose type is not in ``types`` (if given)."""
        with trio.fail_after(timeout):
            while True:
                sse = await anext(self._events)
                assert sse.event == STREAM_EVENT_NAME
                event = decode_stream_event(sse.data)
                if not types or type(event).__struct_config__.tag in types:
                    return event


@asynccontextmanager
async def open_stream(client: httpx.AsyncClient, queen: QueenServer | str,
                      headers: dict[str, str] | None = None,
                      params: dict[str, str] | None = None) -> AsyncIterator[StreamReader]:
    async with aconnect_sse(client, "GET", f"{url_of(queen)}{STREAM_PATH}",
                            headers=dict(headers or {}), params=params) as source:
        assert source.response.status_code == 200
        yield StreamReader(source)


def free_port() -> int:
    """A port free right now on 127.0.0.1, for a server that must come back on the same port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_window_client() -> httpx.AsyncClient:
    """A client whose socket receive buffer is 4 KiB: when it stops reading, the kernel cannot
    absorb the stream, so the queen sees it fall behind after a few events."""
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, read=None))


async def wait_until(predicate, timeout: float = 5.0, poll: float = 0.01) -> None:
    """Poll until ``predicate()`` holds; fail the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)
