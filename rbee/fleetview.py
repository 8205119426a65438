"""The fleet as a stream client sees it: stream events applied in order, rendered as a table.

Used by ``rbee top`` and ``rbee up``. A snapshot replaces everything; ``hive_telemetry`` replaces
one hive's workers (and clears its stale mark); ``hive_stale`` marks a hive; ``hive_removed``
drops it; ``queen`` updates the counts in the header. After ``lagged`` the queen sends a snapshot
at once, so nothing needs repairing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .telemetry import (
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    QueenEvent,
    SnapshotEvent,
    StreamEvent,
    WorkerTelemetry,
)
from .view import table


@dataclass
class HiveView:
    workers: list[WorkerTelemetry]
    stale: bool = False


@dataclass
class FleetView:
    hives: dict[str, HiveView] = field(default_factory=dict)
    summary: QueenEvent | None = None

    def apply(self, event: StreamEvent) -> None:
        match event:
            case SnapshotEvent(hives=hives):
                self.hives = {h.hive.id: HiveView(list(h.workers), h.stale) for h in hives}
            case HiveTelemetryEvent(hive_id=hive_id, workers=workers):
                self.hives[hive_id] = HiveView(list(workers))
            case HiveStaleEvent(hive_id=hive_id) if hive_id in self.hives:
                self.hives[hive_id].stale = True
            case HiveRemovedEvent(hive_id=hive_id):
                self.hives.pop(hive_id, None)
            case QueenEvent():
                self.summary = event

    def render(self) -> str:
        rows = [(hive_id, worker, "STALE" if view.stale else "")
                for hive_id, view in sorted(self.hives.items())
                for worker in sorted(view.workers, key=lambda w: (w.group, w.instance))]
        stale = sum(1 for view in self.hives.values() if view.stale)
        header = f"{len(self.hives)} hives ({stale} stale), {len(rows)} workers"
        if self.summary is not None:
            header += (f"; schedulable: {self.summary.hives_available} hives, "
                       f"{self.summary.workers_available} idle workers")
        return f"{header}\n{table(rows)}"
