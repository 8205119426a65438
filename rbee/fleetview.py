"""The fleet as a stream client sees it: stream events applied in order, rendered as tables.

Used by ``rbee top`` and ``rbee up``. A snapshot replaces everything; ``hive_telemetry``
replaces one hive's workers, GPUs and health (and clears its stale mark); ``hive_stale`` marks
a hive; ``hive_removed`` drops it; ``queen`` updates the counts in the header. After ``lagged``
the queen sends a snapshot at once, so nothing needs repairing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .columns import BAD, OK, WARN, Column, Row, clip
from .contract import (
    Degraded,
    GpuDevice,
    HealthStatus,
    Healthy,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveTelemetryEvent,
    QueenEvent,
    SnapshotEvent,
    StreamEvent,
    Unhealthy,
    WorkerTelemetry,
    describe_health,
)
from .terminal import WORKER_COLUMNS, count, gpu_table, sparkline, table


@dataclass
class HiveView:
    workers: list[WorkerTelemetry]
    stale: bool = False
    gpus: list[GpuDevice] = field(default_factory=list)
    health: HealthStatus | None = None
    idle: frozenset[str] = frozenset()
    """``group/instance`` of the workers the queen judges idle (none while stale)."""


TREND_METRICS = "gpu_util_pct,cpu_pct"


@dataclass
class FleetView:
    hives: dict[str, HiveView] = field(default_factory=dict)
    summary: QueenEvent | None = None
    trends: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """Per worker, its last minute as a sparkline (GPU % for a worker on a GPU, else CPU %),
    from the queen's ``/v1/history``."""

    def apply_history(self, answer: dict) -> None:
        """Take a ``/v1/history`` answer for ``TREND_METRICS``."""
        self.trends = trends_of(answer)

    def apply(self, event: StreamEvent) -> None:
        match event:
            case SnapshotEvent(hives=hives):
                self.hives = {h.hive.id: HiveView(list(h.workers), h.stale, list(h.capabilities),
                                                  h.hive.health_status, frozenset(h.idle))
                              for h in hives}
            case HiveTelemetryEvent(hive_id=hive_id, workers=workers):
                self.hives[hive_id] = HiveView(list(workers), gpus=list(event.capabilities),
                                               health=event.health_status,
                                               idle=frozenset(event.idle))
            case HiveStaleEvent(hive_id=hive_id) if hive_id in self.hives:
                self.hives[hive_id].stale = True
                self.hives[hive_id].idle = frozenset()  # the queen's rule: stale is never idle
            case HiveRemovedEvent(hive_id=hive_id):
                self.hives.pop(hive_id, None)
            case QueenEvent():
                self.summary = event

    def rows(self) -> list[Row]:
        """Every worker's row, by hive then ``group/instance``."""
        return [Row(hive_id, worker, f"{worker.group}/{worker.instance}" in view.idle,
                    _hive_note(view), self.trends.get((hive_id, worker.group, worker.instance), ""),
                    view.stale, _health_level(view.health))
                for hive_id, view in sorted(self.hives.items())
                for worker in sorted(view.workers, key=lambda w: (w.group, w.instance))]

    def header(self, shown: int | None = None) -> str:
        """The fleet in a line: hives, stale ones, workers (``shown`` of them, when filtered),
        and what the queen says is schedulable."""
        stale = sum(1 for view in self.hives.values() if view.stale)
        total = sum(len(view.workers) for view in self.hives.values())
        workers = count(total, "worker") if shown is None or shown == total else \
            f"{shown} of {count(total, 'worker')}"
        header = f"{count(len(self.hives), 'hive')} ({stale} stale), {workers}"
        if self.summary is not None:
            header += (f"; schedulable: {count(self.summary.hives_available, 'hive')}, "
                       f"{count(self.summary.workers_available, 'idle worker')}")
        return header

    def gpus(self) -> list[tuple[str, GpuDevice]]:
        return [(hive_id, gpu) for hive_id, view in sorted(self.hives.items()) for gpu in view.gpus]

    def render(self, width: int | None = None, columns: Sequence[Column] = WORKER_COLUMNS) -> str:
        """The header, the workers' table and the GPUs' table, each line ``width`` at most
        (None: every column at its full width)."""
        text = f"{clip(self.header(), width or 0)}\n{table(self.rows(), width, columns)}"
        if gpus := self.gpus():
            text += f"\n\n{gpu_table(gpus, width)}"
        return text


def trends_of(answer: dict) -> dict[tuple[str, str, str], str]:
    """Per worker of a ``/v1/history`` answer for ``TREND_METRICS``, its sparkline: GPU % for a
    worker on a GPU, else CPU % (scaled to its own peak past 100 %)."""
    by_worker: dict[tuple[str, str, str], dict[str, list]] = {}
    for series in answer.get("series", ()):
        if series.get("instance") is not None:
            key = (series["hive"], series["group"], series["instance"])
            by_worker.setdefault(key, {})[series["metric"]] = series["values"]
    trends = {}
    for key, metrics in by_worker.items():
        gpu = metrics.get("gpu_util_pct") or []
        if any(v for v in gpu):
            trends[key] = sparkline(gpu)
        else:
            cpu = metrics.get("cpu_pct") or []
            trends[key] = sparkline(cpu, max([100.0, *(v for v in cpu if v is not None)]))
    return trends


def _health_level(health: HealthStatus | None) -> int:
    return BAD if isinstance(health, Unhealthy) else WARN if isinstance(health, Degraded) else OK


def _hive_note(view: HiveView) -> str:
    """STALE, and a degraded or unhealthy hive's state, on each of its workers' rows."""
    notes = ["STALE"] if view.stale else []
    if view.health is not None and not isinstance(view.health, Healthy):
        notes.append(f"hive {describe_health(view.health)}")
    return ", ".join(notes)
