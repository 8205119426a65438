"""A stream client's choice of what to hear: ``GET /v1/heartbeats/stream?hive=&model=&events=``.

``hive`` and ``model`` are comma lists (or repeated parameters) of hive ids and model names: a
client hears only of those hives, and of their workers that run one of those models; ``events``
names the events it wants (``STREAM_EVENTS``; by default every one but ``worker_update``). The
``snapshot`` that starts a connection (and follows a lag) is filtered the same way.

Clients are grouped by their filter (a ``Selection`` per distinct filter), so an event is
filtered and encoded once per group, not once per client: the unfiltered clients, usually all
of them, share the one frame the broadcaster makes of each event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import QueryParams

from ..contract import (
    DEFAULT_STREAM_EVENTS,
    ID_MAX_CHARS,
    ID_PATTERN,
    SHORT_TEXT_CHARS,
    STREAM_EVENTS,
    HiveState,
    HiveTelemetryEvent,
    SnapshotEvent,
    StreamEvent,
)
from ..http.errors import ApiError

KNOWN_PARAMETERS = ("hive", "model", "events", "access_token")
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """What one client hears (None: every hive, every model). Hashable: the group key."""

    hives: frozenset[str] | None = None
    models: frozenset[str] | None = None
    events: frozenset[str] = frozenset(DEFAULT_STREAM_EVENTS)

    @property
    def plain(self) -> bool:
        """True for what a client that asks nothing hears: the shared frames as they are."""
        return (self.hives is None and self.models is None
                and self.events == frozenset(DEFAULT_STREAM_EVENTS))

    def hive(self, hive_id: str) -> bool:
        return self.hives is None or hive_id in self.hives

    def model(self, model: str | None) -> bool:
        return self.models is None or model in self.models


PLAIN = StreamFilter()


def _listed(params: QueryParams, name: str) -> list[str] | None:
    values = params.getlist(name)
    if not values:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    if not all(items):
        raise ApiError(400, f"query parameter {name!r}: an empty item in {values!r} (a comma "
                            f"list of names)")
    return items


def parse_stream_filter(params: QueryParams) -> StreamFilter:
    """The filter a stream request asks for; 400 naming each bad parameter or value."""
    unknown = sorted(set(params.keys()) - set(KNOWN_PARAMETERS))
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}; known: "
                            f"{', '.join(KNOWN_PARAMETERS)}")
    hives = _listed(params, "hive")
    bad = [h for h in hives or () if len(h) > ID_MAX_CHARS or not _ID.match(h)]
    if bad:
        raise ApiError(400, f"query parameter 'hive': not a hive id: {', '.join(map(repr, bad))}")
    models = _listed(params, "model")
    bad = [m for m in models or () if len(m) > SHORT_TEXT_CHARS]
    if bad:
        raise ApiError(400, f"query parameter 'model': longer than {SHORT_TEXT_CHARS} "
                            f"characters: {', '.join(repr(m[:40] + '...') for m in bad)}")
    events = _listed(params, "events")
    bad = [e for e in events or () if e not in STREAM_EVENTS]
    if bad:
        raise ApiError(400, f"query parameter 'events': unknown event(s) "
                            f"{', '.join(map(repr, bad))}; known: {', '.join(STREAM_EVENTS)} "
                            f"(snapshot and lagged always come)")
    return StreamFilter(hives=None if hives is None else frozenset(hives),
                        models=None if models is None else frozenset(models),
                        events=frozenset(DEFAULT_STREAM_EVENTS if events is None else events))


class Selection:
    """One filter's view of the stream: which events pass, and what of them. With a model
    filter a hive's event shows only its matching workers; a hive none of whose workers match
    is left out, except once after it had some (an empty worker list: they are gone)."""

    def __init__(self, stream_filter: StreamFilter) -> None:
        self.filter = stream_filter
        self._shown: set[str] = set()
        """Hives whose last event this selection passed had matching workers."""

    def event(self, event: StreamEvent) -> StreamEvent | None:
        """``event`` as this selection shows it (the same object when nothing is left out), or
        None when it shows nothing of it. ``worker_update``s are chosen by the broadcaster."""
        stream_filter = self.filter
        if event.__struct_config__.tag not in stream_filter.events:
            return None
        hive_id = getattr(event, "hive_id", None)
        if hive_id is None:
            return event  # the queen's summary: the fleet's, whatever the filter
        if not stream_filter.hive(hive_id):
            return None
        if stream_filter.models is None or not isinstance(event, HiveTelemetryEvent):
            return event
        workers = [w for w in event.workers if w.model in stream_filter.models]
        if not workers:
            if hive_id not in self._shown:
                return None
            self._shown.discard(hive_id)
        else:
            self._shown.add(hive_id)
        if len(workers) == len(event.workers):
            return event
        kept = {f"{w.group}/{w.instance}" for w in workers}
        return HiveTelemetryEvent(hive_id=hive_id, timestamp=event.timestamp, workers=workers,
                                  capabilities=event.capabilities,
                                  health_status=event.health_status,
                                  idle=[name for name in event.idle if name in kept])

    def snapshot(self, snapshot: SnapshotEvent) -> SnapshotEvent:
        stream_filter = self.filter
        if stream_filter.hives is None and stream_filter.models is None:
            return snapshot
        hives = []
        for state in snapshot.hives:
            if not stream_filter.hive(state.hive.id):
                continue
            if stream_filter.models is not None:
                workers = [w for w in state.workers if w.model in stream_filter.models]
                if not workers:
                    continue
                self._shown.add(state.hive.id)
                kept = {f"{w.group}/{w.instance}" for w in workers}
                state = HiveState(hive=state.hive, stale=state.stale, silent_s=state.silent_s,
                                  last_heartbeat=state.last_heartbeat, workers=workers,
                                  capabilities=state.capabilities,
                                  idle=[name for name in state.idle if name in kept])
            hives.append(state)
        return SnapshotEvent(hives=hives, timestamp=snapshot.timestamp)
