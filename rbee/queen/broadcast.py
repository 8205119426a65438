"""Fan-out of stream events to any number of SSE clients, none of which can hold up another.

Each event is encoded once into its SSE frame and offered to every client's own bounded channel
without waiting. A client whose backlog is full (``client_buffer`` events or
``client_buffer_bytes`` bytes) is marked lagged and its backlog let go at once: it misses events
until its reader comes back, then gets a ``lagged`` notice and a fresh ``snapshot`` instead,
because every heartbeat carries a hive's whole state and the current state is all a view needs.
So a slow client pins at most ``client_buffer_bytes`` of shared frames, a lagged one costs one
counter per event, ingestion never waits on it, and its backlog is written in pieces of at most
``write_chunk_bytes`` (no join of a whole backlog on the event loop).

Every event carries the SSE ``id:`` its store gave it (``rbee/queen/store.py``); a client that
reconnects with ``Last-Event-ID`` gets the events it missed, if the store still has them all
(its ``Replay``), and then the live stream, each event once; otherwise it starts again from a
snapshot. The broadcaster holds no store: the replay is given to each ``stream``.

``publish`` and ``subscribe`` run on the queen's trio thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Protocol

import trio
from sse_starlette import ServerSentEvent

from ..contract import STREAM_EVENT_NAME, LaggedEvent, SnapshotEvent, StreamEvent, encode, utc_now


class Replay(Protocol):
    """Where a resuming client's missed events come from: the store that gave the ids."""

    @property
    def position(self) -> str:
        """The id of the last event handed to the broadcaster."""

    async def missed(self, last_id: str, upto: str
                     ) -> list[tuple[str, StreamEvent | bytes]] | None:
        """The events after ``last_id`` up to ``upto`` (included), or None when some of them are
        no longer kept (or ``last_id`` is not one of this store's): the client needs a snapshot."""

    async def caught_up(self, event_id: str) -> None:
        """Wait (briefly) until this queen has published ``event_id``, so a client that read it
        from a queen ahead of this one is not sent it again."""

_HEAD = b"event: %s\r\ndata: " % STREAM_EVENT_NAME.encode()

RECONNECT_MS = 1000
"""Sent with each connection's first snapshot: how soon an EventSource client should reconnect."""


class Subscription:
    """One client's place in the stream: a backlog of encoded frames, bounded in events and in
    bytes. The frames are shared with every other client, so what a client pins is only what its
    backlog refers to; past either bound the backlog is let go at once (a new empty deque, no
    copy) and the client resyncs when its reader comes back."""

    def __init__(self, buffer: int, buffer_bytes: int, write_chunk_bytes: int) -> None:
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.write_chunk_bytes = write_chunk_bytes
        self._backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self._wakeup = trio.Event()
        self._closed = False
        self.dropped = 0
        """Events not delivered since the client last caught up; non-zero means lagged."""

    def offer(self, frame: bytes) -> None:
        if self._closed:
            return
        if self.dropped:
            self.dropped += 1
            return
        if (len(self._backlog) >= self.buffer
                or self.backlog_bytes + len(frame) > self.buffer_bytes):
            self.dropped = len(self._backlog) + 1
            self._backlog, self.backlog_bytes = deque(), 0
        else:
            self._backlog.append(frame)
            self.backlog_bytes += len(frame)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def _piece(self) -> bytes:
        """The next frames to write, together at most ``write_chunk_bytes`` (a larger frame goes
        alone, as the object every client shares): catching up never copies a whole backlog."""
        frame = self._backlog.popleft()
        size = len(frame)
        if not self._backlog or size + len(self._backlog[0]) > self.write_chunk_bytes:
            self.backlog_bytes -= size
            return frame
        batch = [frame]
        while self._backlog and size + len(self._backlog[0]) <= self.write_chunk_bytes:
            frame = self._backlog.popleft()
            batch.append(frame)
            size += len(frame)
        self.backlog_bytes -= size
        return b"".join(batch)

    async def frames(self, resync: Callable[[int], Iterator[bytes]]) -> AsyncIterator[bytes]:
        """The bytes to write to this client, until the broadcaster closes: the backlog in
        bounded pieces. After a lag, ``resync(dropped)`` supplies the frames that replace what
        was let go."""
        while True:
            if self._backlog:
                yield self._piece()
            elif self.dropped:
                dropped, self.dropped = self.dropped, 0
                for replacement in resync(dropped):
                    yield replacement
            elif self._closed:
                return
            else:
                self._wakeup = trio.Event()
                await self._wakeup.wait()


class Broadcaster:
    def __init__(self, *, client_buffer: int, max_clients: int,
                 snapshot: Callable[[], SnapshotEvent], client_buffer_bytes: int,
                 write_chunk_bytes: int) -> None:
        self.client_buffer = client_buffer
        self.client_buffer_bytes = client_buffer_bytes
        self.write_chunk_bytes = write_chunk_bytes
        self.max_clients = max_clients
        self._snapshot = snapshot
        self._subscribers: set[Subscription] = set()
        self.closed = False
        self.lagged_total = 0
        """Times a client lagged and was resynced (the queen's ``/metrics``)."""

    @property
    def client_count(self) -> int:
        return len(self._subscribers)

    @property
    def full(self) -> bool:
        return len(self._subscribers) >= self.max_clients

    def frame(self, event: StreamEvent | bytes, event_id: str | None, *,
              retry_ms: int | None = None) -> bytes:
        """The SSE frame of one event (or its JSON): ``event: heartbeat``, its id, the JSON.

        Compact JSON is one line, so the frame is put together as bytes (sse-starlette's
        ``ServerSentEvent`` writes the same bytes through a string buffer and a regex, 80 µs for
        a fleet heartbeat's event, and it runs for every event while a client listens); anything
        else (a line break in the data or the id, a retry) takes ``ServerSentEvent``."""
        data = event if isinstance(event, bytes) else encode(event)
        if (retry_ms is None and b"\n" not in data and b"\r" not in data
                and (event_id is None or event_id.isprintable())):
            head = _HEAD if event_id is None else b"id: %s\r\n%s" % (event_id.encode(), _HEAD)
            return head + data + b"\r\n\r\n"
        return ServerSentEvent(data.decode(), event=STREAM_EVENT_NAME, id=event_id,
                               retry=retry_ms).encode()

    def publish(self, event: StreamEvent | bytes, event_id: str) -> None:
        """Offer one event to every client; never waits (nor encodes, with no client)."""
        if not self._subscribers:
            return
        frame = self.frame(event, event_id)
        for subscription in self._subscribers:
            subscription.offer(frame)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self.client_buffer, self.client_buffer_bytes,
                                    self.write_chunk_bytes)
        if self.closed:
            subscription.close()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    async def stream(self, store: Replay, last_event_id: str | None = None
                     ) -> AsyncIterator[bytes]:
        """One client's whole stream: the fleet snapshot (or, resuming after ``last_event_id``,
        the events it missed in ``store``), then every event as it is published.

        Subscribing and reading the store's position (and taking the snapshot) happen with no
        checkpoint between them, so the client misses nothing and gets nothing twice. Ends when
        the broadcaster closes; the subscription is dropped however the stream ends (client
        gone, cancelled)."""
        resync = partial(self._resync, store)
        if last_event_id is not None:
            await store.caught_up(last_event_id)
            with self.subscribe() as subscription:
                missed = await store.missed(last_event_id, store.position)
                if missed is not None:
                    for event_id, event in missed:
                        yield self.frame(event, event_id)
                    async for frame in subscription.frames(resync):
                        yield frame
                    return
        with self.subscribe() as subscription:
            yield self.frame(self._snapshot(), store.position, retry_ms=RECONNECT_MS)
            async for frame in subscription.frames(resync):
                yield frame

    def resync_all(self, position: str) -> None:
        """Send every client a fresh snapshot as of ``position`` (the store reloaded the fleet
        after losing Redis): what they hold may describe hives that are gone."""
        if self._subscribers:
            frame = self.frame(self._snapshot(), position)
            for subscription in self._subscribers:
                subscription.offer(frame)

    def _resync(self, store: Replay, dropped: int) -> Iterator[bytes]:
        self.lagged_total += 1
        yield self.frame(LaggedEvent(dropped=dropped, timestamp=utc_now()), None)
        yield self.frame(self._snapshot(), store.position)

    def close(self) -> None:
        """End every client's stream (at shutdown): their responses finish instead of hanging."""
        self.closed = True
        for subscription in self._subscribers:
            subscription.close()
