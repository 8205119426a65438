"""Fan-out of stream events to any number of SSE clients, none of which can hold up another.

Each event is encoded once into its SSE frame and offered to every client's own bounded channel
without waiting. A client whose channel is full is marked lagged: it misses events until its reader
catches up, then gets a ``lagged`` notice and a fresh ``snapshot`` instead of the backlog, because
every heartbeat carries a hive's whole state and the current state is all a view needs. So a slow
client costs the queen at most ``client_buffer`` shared frames, and ingestion never waits on it.

``publish`` and ``subscribe`` run on the queen's trio thread.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import trio
from sse_starlette import ServerSentEvent

from ..telemetry import STREAM_EVENT_NAME, LaggedEvent, SnapshotEvent, StreamEvent, encode, utc_now

RECONNECT_MS = 1000
"""Sent with each connection's first snapshot: how soon an EventSource client should reconnect."""


class Subscription:
    """One client's place in the stream: a bounded channel of encoded frames."""

    def __init__(self, buffer: int) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](buffer)
        self.dropped = 0
        """Events not delivered since the client last caught up; non-zero means lagged."""

    def offer(self, frame: bytes) -> None:
        if self.dropped:
            self.dropped += 1
            return
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self.dropped = 1
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        self._send.close()

    async def frames(self, resync: Callable[[int], Iterator[bytes]]) -> AsyncIterator[bytes]:
        """The bytes to write to this client, until the broadcaster closes. Frames queued while
        the client was being written to go out together in one write. After a lag, the backlog
        is discarded and ``resync(dropped)`` supplies the frames that replace it."""
        async for frame in self._receive:
            if not self.dropped:
                batch = [frame]
                while True:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                yield frame if len(batch) == 1 else b"".join(batch)
                continue
            discarded = 1
            while True:
                try:
                    self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                discarded += 1
            dropped, self.dropped = self.dropped + discarded, 0
            for replacement in resync(dropped):
                yield replacement


class Broadcaster:
    def __init__(self, *, client_buffer: int, max_clients: int,
                 snapshot: Callable[[], SnapshotEvent]) -> None:
        self.client_buffer = client_buffer
        self.max_clients = max_clients
        self._snapshot = snapshot
        self._subscribers: set[Subscription] = set()
        self._ids = itertools.count(1)
        self.closed = False
        self.lagged_total = 0
        """Times a client lagged and was resynced (the queen's ``/metrics``)."""

    @property
    def client_count(self) -> int:
        return len(self._subscribers)

    @property
    def full(self) -> bool:
        return len(self._subscribers) >= self.max_clients

    def frame(self, event: StreamEvent, *, retry_ms: int | None = None) -> bytes:
        """The SSE frame of one event: ``event: heartbeat``, an increasing id, the JSON data."""
        return ServerSentEvent(encode(event).decode(), event=STREAM_EVENT_NAME,
                               id=str(next(self._ids)), retry=retry_ms).encode()

    def publish(self, event: StreamEvent) -> None:
        """Offer one event to every client; never waits."""
        if not self._subscribers:
            return
        frame = self.frame(event)
        for subscription in self._subscribers:
            subscription.offer(frame)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self.client_buffer)
        if self.closed:
            subscription.close()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    async def stream(self) -> AsyncIterator[bytes]:
        """One client's whole stream: the fleet snapshot, then every event as it is published.

        Subscribing and taking the snapshot happen with no checkpoint between them, so the client
        misses nothing and its view is whole from the first event. Ends when the broadcaster
        closes; the subscription is dropped however the stream ends (client gone, cancelled)."""
        with self.subscribe() as subscription:
            yield self.frame(self._snapshot(), retry_ms=RECONNECT_MS)
            async for frame in subscription.frames(self._resync):
                yield frame

    def _resync(self, dropped: int) -> Iterator[bytes]:
        self.lagged_total += 1
        yield self.frame(LaggedEvent(dropped=dropped, timestamp=utc_now()))
        yield self.frame(self._snapshot())

    def close(self) -> None:
        """End every client's stream (at shutdown): their responses finish instead of hanging."""
        self.closed = True
        for subscription in self._subscribers:
            subscription.close()
