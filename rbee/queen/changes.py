"""What changed in each worker since the last heartbeat of its hive: the ``worker_update``
events of the stream.

A full ``hive_telemetry`` per heartbeat to every client does not scale to thousands of hives
(most figures of most workers do not move between two heartbeats); a client that asks for
``worker_update`` gets only the figures that moved. The comparison is the structs' own: equal
workers (msgspec compares them in C) cost nothing more, and only the fields of a worker that
differs are compared one by one.
"""

from __future__ import annotations

from datetime import datetime

from ..contract import (
    HiveRemovedEvent,
    HiveState,
    HiveTelemetryEvent,
    WorkerFields,
    WorkerTelemetry,
    WorkerUpdateEvent,
)

_FIGURES = tuple(name for name in WorkerTelemetry.__struct_fields__
                 if name not in ("group", "instance"))

Workers = dict[tuple[str, str], WorkerTelemetry]
Update = tuple[str | None, WorkerUpdateEvent]
"""An update and its worker's model (for a client's ``model=`` filter: the update itself names
the model only when it changed)."""


def changed_fields(before: WorkerTelemetry | None, after: WorkerTelemetry) -> dict[str, object]:
    """The figures of ``after`` that differ from ``before`` (all of them with no ``before``)."""
    if before is None:
        return {name: getattr(after, name) for name in _FIGURES}
    changed = {}
    for name in _FIGURES:
        value = getattr(after, name)
        if value != getattr(before, name):
            changed[name] = value
    return changed


def updates_between(hive_id: str, timestamp: datetime, before: Workers,
                    after: list[WorkerTelemetry]) -> tuple[list[Update], Workers]:
    """The updates that take a view from ``before`` (a hive's workers by ``(group, instance)``)
    to ``after``, and ``after`` keyed the same way: the next call's ``before``."""
    updates = []
    now: Workers = {}
    for worker in after:
        key = (worker.group, worker.instance)
        now[key] = worker
        previous = before.get(key)
        if previous is not None and previous == worker:
            continue
        updates.append((worker.model, WorkerUpdateEvent(
            hive_id=hive_id, group=worker.group, instance=worker.instance, timestamp=timestamp,
            fields=WorkerFields(**changed_fields(previous, worker)))))
    for key in before.keys() - now.keys():
        updates.append(_removal(hive_id, before[key], timestamp))
    return updates, now


class WorkerChanges:
    """The last record of every worker, to tell what the next heartbeat changed. Kept only while
    some client asks for ``worker_update`` (``Broadcaster``); seeded from the snapshot that
    client starts from, so its first updates are already small."""

    def __init__(self, hives: list[HiveState]) -> None:
        self._hives: dict[str, Workers] = {
            state.hive.id: {(w.group, w.instance): w for w in state.workers} for state in hives}

    def telemetry(self, event: HiveTelemetryEvent) -> list[Update]:
        updates, self._hives[event.hive_id] = updates_between(
            event.hive_id, event.timestamp, self._hives.get(event.hive_id, {}), event.workers)
        return updates

    def removed(self, event: HiveRemovedEvent) -> list[Update]:
        workers = self._hives.pop(event.hive_id, {})
        return [_removal(event.hive_id, worker, event.timestamp) for worker in workers.values()]


def _removal(hive_id: str, worker: WorkerTelemetry, timestamp: datetime) -> Update:
    return worker.model, WorkerUpdateEvent(hive_id=hive_id, group=worker.group,
                                           instance=worker.instance, timestamp=timestamp,
                                           removed=True)
