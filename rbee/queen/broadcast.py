"""Fan-out of stream events to any number of SSE clients, none of which can hold up another.

Each event is encoded once into its SSE frame and offered to every client's own bounded channel
without waiting. A client whose backlog is full (``client_buffer`` events or
``client_buffer_bytes`` bytes) is marked lagged and its backlog let go at once: it misses events
until its reader comes back, then gets a ``lagged`` notice and a fresh ``snapshot`` instead,
because every heartbeat carries a hive's whole state and the current state is all a view needs.
So a slow client pins at most ``client_buffer_bytes`` of shared frames, a lagged one costs one
counter per event, ingestion never waits on it, and its backlog is written in pieces of at most
``write_chunk_bytes`` (no join of a whole backlog on the event loop).

Clients that choose what they hear (``?hive=&model=&events=``, ``rbee/queen/streamfilter.py``)
are grouped by their filter: each event is filtered and encoded once per group, and the
unfiltered group gets the shared frame. ``worker_update``s are computed once per heartbeat
(``rbee/queen/changes.py``) while some client asks for them.

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

from ..contract import (
    STREAM_EVENT_NAME,
    HiveRemovedEvent,
    HiveTelemetryEvent,
    LaggedEvent,
    SnapshotEvent,
    StreamEvent,
    decode_stream_event,
    encode,
    utc_now,
)
from .changes import Update, WorkerChanges
from .streamfilter import PLAIN, Selection, StreamFilter


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
_QUEEN = b'{"type":"queen"'
"""How the fleet summary's JSON starts (msgspec writes the tag first)."""

Direct = Callable[[bytes], int]
"""A non-blocking write to a client's socket while its writer is idle: the bytes it took
(``rbee/http/rawstream.py``'s ``DirectWrite``)."""

RECONNECT_MS = 1000
"""Sent with each connection's first snapshot: how soon an EventSource client should reconnect."""


class Subscription:
    """One client's place in the stream: a backlog of encoded frames, bounded in events and in
    bytes. The frames are shared with every other client, so what a client pins is only what its
    backlog refers to; past either bound the backlog is let go at once (a new empty deque, no
    copy) and the client resyncs when its reader comes back."""

    def __init__(self, buffer: int, buffer_bytes: int, write_chunk_bytes: int,
                 selection: Selection | None = None, direct: Direct | None = None) -> None:
        self.selection = selection or Selection(PLAIN)
        """What this client hears (shared with the other clients of the same filter)."""
        self.direct = direct
        self._parked = False
        """True while the client's writer waits for frames (nothing of its own in flight)."""
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
        if self._parked and not self._backlog and self.direct is not None:
            sent = self.direct(frame)
            if sent == len(frame):
                return  # in the client's socket already: no task to wake
            frame = frame[sent:] if sent else frame
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
                self._parked = True
                try:
                    await self._wakeup.wait()
                finally:
                    self._parked = False


def _updates_lost(missed: list[tuple[str, StreamEvent | bytes]],
                  stream_filter: StreamFilter) -> bool:
    """Whether a ``worker_update`` client missed a change of its hives: the store keeps whole
    heartbeats, not what changed since the client's last one, so it needs a snapshot."""
    if "worker_update" not in stream_filter.events:
        return False
    for _, event in missed:
        if isinstance(event, bytes):
            if b'"hive_removed"' not in event[:40] and b'"hive_telemetry"' not in event[:40]:
                continue
            event = decode_stream_event(event)
        if (isinstance(event, HiveTelemetryEvent | HiveRemovedEvent)
                and stream_filter.hive(event.hive_id)):
            return True
    return False


class Published:
    """One event as the groups of clients need it, each form made at most once: its struct
    (decoded when the store gave JSON), its JSON, its frame, and its workers' updates."""

    def __init__(self, broadcaster: Broadcaster, event: StreamEvent | bytes,
                 event_id: str | None) -> None:
        self.broadcaster, self.raw, self.event_id = broadcaster, event, event_id
        self._struct: StreamEvent | None = None if isinstance(event, bytes) else event
        self._frame: bytes | None = None
        self._data: bytes | None = None
        self.updates: list[tuple[str | None, bytes, str]] = []
        """``(model, JSON, hive id)`` of each ``worker_update`` of this event."""

    @property
    def summary(self) -> bool:
        """Whether it is the fleet summary (``queen``), which every filter passes whole or not
        at all: its JSON (2.4 MB at 80,000 workers) is never decoded for a filtered client."""
        raw = self.raw
        if isinstance(raw, bytes):
            return raw.startswith(_QUEEN)
        return raw.__struct_config__.tag == "queen"

    @property
    def struct(self) -> StreamEvent:
        if self._struct is None:
            assert isinstance(self.raw, bytes)
            self._struct = decode_stream_event(self.raw)
        return self._struct

    def frame(self) -> bytes:
        if self._frame is None:
            raw = self.raw if isinstance(self.raw, bytes) else self.frame_data()
            self._frame = self.broadcaster.frame(raw, self.event_id)
        return self._frame

    def data(self, event: StreamEvent) -> bytes:
        """The JSON of ``event``: the store's own when it is this event unchanged."""
        if event is self._struct:
            return self.raw if isinstance(self.raw, bytes) else self.frame_data()
        return encode(event)

    def frame_data(self) -> bytes:
        if self._data is None:
            self._data = encode(self.struct)
        return self._data


class Group:
    """The clients of one filter, and its ``Selection``."""

    def __init__(self, stream_filter: StreamFilter) -> None:
        self.selection = Selection(stream_filter)
        self.subscribers: set[Subscription] = set()

    def frame(self, published: Published) -> bytes | None:
        """What this group's clients get of ``published``: nothing, the shared frame, or frames
        made for them (the filtered event, then its updates; the event id on the last one)."""
        selection = self.selection
        stream_filter = selection.filter
        if stream_filter.plain:
            return published.frame()
        if published.summary:
            return published.frame() if "queen" in stream_filter.events else None
        parts: list[bytes] = []
        shown = selection.event(published.struct)
        if shown is not None:
            parts.append(published.data(shown))
        if published.updates and "worker_update" in stream_filter.events:
            parts.extend(data for model, data, hive_id in published.updates
                         if stream_filter.hive(hive_id) and stream_filter.model(model))
        if not parts:
            return None
        if len(parts) == 1 and shown is not None and shown is published.struct:
            return published.frame()  # the event as every unfiltered client gets it
        frame = published.broadcaster.frame
        return b"".join([*(frame(data, None) for data in parts[:-1]),
                         frame(parts[-1], published.event_id)])


class Broadcaster:
    def __init__(self, *, client_buffer: int, max_clients: int,
                 snapshot: Callable[[], SnapshotEvent], client_buffer_bytes: int,
                 write_chunk_bytes: int) -> None:
        self.client_buffer = client_buffer
        self.client_buffer_bytes = client_buffer_bytes
        self.write_chunk_bytes = write_chunk_bytes
        self.max_clients = max_clients
        self._snapshot = snapshot
        self._groups: dict[StreamFilter, Group] = {}
        self._count = 0
        self._changes: WorkerChanges | None = None
        """Every worker's last record, while some client asks for ``worker_update``."""
        self._update_groups = 0
        self.closed = False
        self.lagged_total = 0
        """Times a client lagged and was resynced (the queen's ``/metrics``)."""

    @property
    def client_count(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self.max_clients

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
        if not self._count:
            return
        published = Published(self, event, event_id)
        if self._changes is not None:
            published.updates = [(model, encode(update), update.hive_id)
                                 for model, update in self._updates_of(published)]
        for group in self._groups.values():
            frame = group.frame(published)
            if frame is not None:
                for subscription in group.subscribers:
                    subscription.offer(frame)

    def _updates_of(self, published: Published) -> list[Update]:
        changes = self._changes
        assert changes is not None
        raw = published.raw
        if isinstance(raw, bytes) and b'"hive_removed"' not in raw[:40]:
            return []  # from a shared store: a heartbeat comes as a struct, only removals matter
        event = published.struct
        if isinstance(event, HiveTelemetryEvent):
            return changes.telemetry(event)
        if isinstance(event, HiveRemovedEvent):
            return changes.removed(event)
        return []

    @contextmanager
    def subscribe(self, stream_filter: StreamFilter = PLAIN, direct: Direct | None = None
                  ) -> Iterator[Subscription]:
        group = self._groups.get(stream_filter)
        if group is None:
            group = self._groups[stream_filter] = Group(stream_filter)
            if "worker_update" in stream_filter.events:
                self._update_groups += 1
                if self._changes is None:
                    self._changes = WorkerChanges(self._snapshot().hives)
        subscription = Subscription(self.client_buffer, self.client_buffer_bytes,
                                    self.write_chunk_bytes, group.selection, direct)
        if self.closed:
            subscription.close()
        group.subscribers.add(subscription)
        self._count += 1
        try:
            yield subscription
        finally:
            group.subscribers.discard(subscription)
            self._count -= 1
            if not group.subscribers and self._groups.get(stream_filter) is group:
                del self._groups[stream_filter]
                if "worker_update" in stream_filter.events:
                    self._update_groups -= 1
                    if not self._update_groups:
                        self._changes = None

    async def stream(self, store: Replay, last_event_id: str | None = None,
                     stream_filter: StreamFilter = PLAIN, direct: Direct | None = None
                     ) -> AsyncIterator[bytes]:
        """One client's whole stream: the fleet snapshot (or, resuming after ``last_event_id``,
        the events it missed in ``store``), then every event as it is published; all of it as
        ``stream_filter`` chooses.

        Subscribing and reading the store's position (and taking the snapshot) happen with no
        checkpoint between them, so the client misses nothing and gets nothing twice. Ends when
        the broadcaster closes; the subscription is dropped however the stream ends (client
        gone, cancelled). ``direct``: a write to the client's socket, for frames published while
        its writer is idle."""
        if last_event_id is not None:
            await store.caught_up(last_event_id)
            with self.subscribe(stream_filter, direct) as subscription:
                missed = await store.missed(last_event_id, store.position)
                if missed is not None and not _updates_lost(missed, stream_filter):
                    for frame in self._replayed(missed, stream_filter):
                        yield frame
                    async for frame in subscription.frames(
                            partial(self._resync, store, subscription.selection)):
                        yield frame
                    return
        with self.subscribe(stream_filter, direct) as subscription:
            selection = subscription.selection
            yield self.frame(selection.snapshot(self._snapshot()), store.position,
                             retry_ms=RECONNECT_MS)
            async for frame in subscription.frames(partial(self._resync, store, selection)):
                yield frame

    def _replayed(self, missed: list[tuple[str, StreamEvent | bytes]],
                  stream_filter: StreamFilter) -> Iterator[bytes]:
        """The frames of the missed events as this client's filter shows them, made for it
        alone (a resume is rare)."""
        if stream_filter.plain:
            for event_id, event in missed:
                yield self.frame(event, event_id)
            return
        group = Group(stream_filter)
        for event_id, event in missed:
            frame = group.frame(Published(self, event, event_id))
            if frame is not None:
                yield frame

    def resync_all(self, position: str) -> None:
        """Send every client a fresh snapshot as of ``position`` (the store reloaded the fleet
        after losing Redis): what they hold may describe hives that are gone."""
        if self._count:
            snapshot = self._snapshot()
            if self._changes is not None:
                self._changes = WorkerChanges(snapshot.hives)
            for group in self._groups.values():
                frame = self.frame(group.selection.snapshot(snapshot), position)
                for subscription in group.subscribers:
                    subscription.offer(frame)

    def _resync(self, store: Replay, selection: Selection, dropped: int) -> Iterator[bytes]:
        self.lagged_total += 1
        yield self.frame(LaggedEvent(dropped=dropped, timestamp=utc_now()), None)
        yield self.frame(selection.snapshot(self._snapshot()), store.position)

    def close(self) -> None:
        """End every client's stream (at shutdown): their responses finish instead of hanging."""
        self.closed = True
        for group in self._groups.values():
            for subscription in group.subscribers:
                subscription.close()
