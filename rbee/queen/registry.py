"""The queen's fleet view: every hive, its workers and GPUs, and the scheduling queries over them.

A hive's record is replaced whole by each heartbeat (never merged), so a worker that is gone from
the hive is gone from the registry at the next heartbeat. Silence is judged by the queen's own
monotonic clock at receipt, never by the hive's timestamp, which may be wrong. A silent hive goes
through two steps: *stale* (still listed, no longer scheduled) and then *removed* with all its
workers. If most of the fleet falls silent at once the fault is more likely on the queen's side
(its network, a stall), so nothing is removed until that clears, as Kubernetes' node lifecycle
controller and Nomad's heartbeat grace do.

Every method takes one lock and returns fresh lists, so trio tasks and threads may read and write
concurrently; the structs inside are never mutated after they are stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from .._errors import NotFoundError
from ..config import RegistrySettings
from ..exposition import HiveRecord
from ..telemetry import (
    GpuDevice,
    HiveHeartbeat,
    HiveInfo,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveState,
    OperationalStatus,
    QueenEvent,
    SnapshotEvent,
    Unhealthy,
    WorkerState,
    WorkerTelemetry,
    utc_now,
)
from .silence import judge

log = logging.getLogger(__name__)

SCHEDULABLE_STATUSES = frozenset({OperationalStatus.READY, OperationalStatus.BUSY})


class VramFigures(msgspec.Struct, kw_only=True):
    """VRAM of the GPU(s) a worker runs on. A scheduler needs both figures: ``free_mb`` is what
    the driver measures as free now; ``claimed_mb`` is what rbee workers on those GPUs hold."""

    gpu_indices: list[int]
    total_mb: float
    free_mb: float
    claimed_mb: float
    measured: bool
    """False when the hive sent no device list: ``free_mb`` is then the worker's own GPU total
    less the VRAM it uses, the best estimate there is."""


class FleetWorker(msgspec.Struct, kw_only=True):
    """One worker as the queen sees it: where it runs, whether it may be scheduled, its VRAM."""

    hive_id: str
    hive_stale: bool
    schedulable: bool
    worker: WorkerTelemetry
    vram: VramFigures | None = None
    unhealthy_gpus: list[str] = []
    """UUIDs of the worker's GPUs whose health is unhealthy (skipped by scheduling queries when
    ``registry.skip_unhealthy_gpus``)."""

    @property
    def id(self) -> str:
        return worker_id(self.hive_id, self.worker)


def is_idle(worker: WorkerTelemetry, idle_gpu_util_pct: float) -> bool:
    """Whether a worker can take new work now. The engine knows best: when its state is known,
    idle means no request running and none waiting, whatever the GPU shows. Otherwise the GPU
    decides: utilisation at or under ``idle_gpu_util_pct``; an unknown figure (None) is never
    idle."""
    engine = worker.engine
    if engine is not None:
        return engine.requests_running == 0 and engine.requests_waiting == 0
    util = worker.gpu_util_pct
    return util is not None and util <= idle_gpu_util_pct


def worker_id(hive_id: str, worker: WorkerTelemetry) -> str:
    return f"{hive_id}/{worker.group}/{worker.instance}"


@dataclass(slots=True)
class _HiveEntry:
    info: HiveInfo
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice]
    last_heartbeat: datetime
    received_at: float
    stale: bool = False

    @property
    def schedulable(self) -> bool:
        return (not self.stale and self.info.operational_status in SCHEDULABLE_STATUSES
                and not isinstance(self.info.health_status, Unhealthy))


@dataclass(slots=True)
class SweepResult:
    """What one stale-cleanup pass changed; the queen announces each event on the stream."""

    stale: list[HiveStaleEvent] = field(default_factory=list)
    removed: list[HiveRemovedEvent] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    """Hives silent past ``remove_after_s`` but kept by the mass-silence guard."""


class HiveRegistry:
    def __init__(self, settings: RegistrySettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or RegistrySettings()
        self._clock = clock
        self._hives: dict[str, _HiveEntry] = {}
        self._lock = threading.Lock()
        self._last_sweep: float | None = None
        self._holding = False

    # -- writing ---------------------------------------------------------------------------

    def update_hive(self, heartbeat: HiveHeartbeat, received_at: float | None = None, *,
                    stale: bool = False) -> None:
        """Store a heartbeat: the hive's info, workers and GPUs replace what was there.
        ``received_at`` (on the registry's clock) is now unless given: a queen that mirrors a
        shared store passes the time the store received it."""
        entry = _HiveEntry(info=heartbeat.hive, workers=list(heartbeat.workers),
                           capabilities=list(heartbeat.capabilities),
                           last_heartbeat=heartbeat.timestamp,
                           received_at=self._clock() if received_at is None else received_at,
                           stale=stale)
        with self._lock:
            self._hives[heartbeat.hive.id] = entry

    def mark_stale(self, hive_id: str) -> None:
        """Flag a hive stale as another queen's sweep judged it (until its next heartbeat)."""
        with self._lock:
            entry = self._hives.get(hive_id)
            if entry is not None:
                entry.stale = True

    def clear(self) -> None:
        """Forget every hive (a mirror about to reload the shared store)."""
        with self._lock:
            self._hives.clear()

    def update_workers(self, hive_id: str, workers: list[WorkerTelemetry]) -> None:
        """Replace a known hive's workers (never appends). Raises NotFoundError for a hive that
        never sent a heartbeat: a worker list without its hive has nowhere to belong."""
        with self._lock:
            self._entry(hive_id).workers = list(workers)

    def remove_hive(self, hive_id: str, reason: str = "removed") -> HiveRemovedEvent | None:
        with self._lock:
            entry = self._hives.pop(hive_id, None)
        return None if entry is None else _removed(hive_id, entry, reason)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._hives)

    def hive_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._hives)

    def get_hive(self, hive_id: str) -> HiveState:
        """One hive as a snapshot shows it. Raises NotFoundError naming an unknown hive."""
        now = self._clock()
        with self._lock:
            return self._state(hive_id, self._entry(hive_id), now)

    def hives(self) -> list[HiveState]:
        now = self._clock()
        with self._lock:
            return [self._state(hive_id, entry, now)
                    for hive_id, entry in sorted(self._hives.items())]

    def get_workers(self, hive_id: str) -> list[WorkerTelemetry]:
        """A hive's workers as last reported; empty for a hive the registry does not know."""
        with self._lock:
            entry = self._hives.get(hive_id)
            return list(entry.workers) if entry is not None else []

    def records(self) -> list[HiveRecord]:
        """Every hive as a scrape reads it: the stored structs themselves (never mutated), so
        the lock is held only to copy the list."""
        now = self._clock()
        with self._lock:
            return [HiveRecord(info=e.info, workers=e.workers, gpus=e.capabilities, stale=e.stale,
                               silent_s=round(max(0.0, now - e.received_at), 3))
                    for e in self._hives.values()]

    def get_all_workers(self) -> list[FleetWorker]:
        """Every worker of every hive, stale hives included (flagged), flattened."""
        with self._lock:
            return list(self._fleet_workers())

    def snapshot(self) -> SnapshotEvent:
        return SnapshotEvent(hives=self.hives(), timestamp=utc_now())

    def summary(self) -> QueenEvent:
        """Counts for the stream's ``queen`` event: online is not stale, available is
        schedulable (for workers: also idle)."""
        with self._lock:
            online = [w for w in self._fleet_workers(with_vram=False) if not w.hive_stale]
            hives_online = sorted(h for h, e in self._hives.items() if not e.stale)
            hives_available = sum(1 for e in self._hives.values() if e.schedulable)
        return QueenEvent(
            workers_online=len(online),
            workers_available=sum(1 for w in online if w.schedulable and self._is_idle(w)),
            hives_online=len(hives_online), hives_available=hives_available,
            worker_ids=[w.id for w in online], hive_ids=hives_online, timestamp=utc_now())

    # -- scheduling queries ----------------------------------------------------------------

    def find_workers(self, *, idle: bool = False, model: str | None = None,
                     min_free_vram_mb: float | None = None, max_waiting: int | None = None,
                     max_kv_cache_pct: float | None = None) -> list[FleetWorker]:
        """Schedulable workers matching every given condition. ``max_waiting`` and
        ``max_kv_cache_pct`` ask the worker's engine, so a worker whose engine state is unknown
        (or whose engine publishes no KV-cache figure) does not match them."""
        with self._lock:
            found = [w for w in self._fleet_workers() if w.schedulable]
        if idle:
            found = [w for w in found if self._is_idle(w)]
        if model is not None:
            found = [w for w in found if w.worker.model == model]
        if min_free_vram_mb is not None:
            found = [w for w in found
                     if w.vram is not None and w.vram.free_mb >= min_free_vram_mb]
        if max_waiting is not None:
            found = [w for w in found if w.worker.engine is not None
                     and w.worker.engine.requests_waiting <= max_waiting]
        if max_kv_cache_pct is not None:
            found = [w for w in found if w.worker.engine is not None
                     and w.worker.engine.kv_cache_pct is not None
                     and w.worker.engine.kv_cache_pct <= max_kv_cache_pct]
        return found

    def find_idle_workers(self) -> list[FleetWorker]:
        """Idle workers (``is_idle``): no request in their engine, else a GPU at or under
        ``idle_gpu_util_pct``."""
        return self.find_workers(idle=True)

    def find_workers_with_model(self, model: str) -> list[FleetWorker]:
        return self.find_workers(model=model)

    def find_workers_with_capacity(self, vram_mb: float) -> list[FleetWorker]:
        """Workers whose GPU(s) have at least ``vram_mb`` MiB free, as the driver measures it on
        the real device (never an assumed card size)."""
        return self.find_workers(min_free_vram_mb=vram_mb)

    def _is_idle(self, worker: FleetWorker) -> bool:
        return is_idle(worker.worker, self.settings.idle_gpu_util_pct)

    # -- stale cleanup ---------------------------------------------------------------------

    def sweep(self) -> SweepResult:
        """Mark silent hives stale and remove those silent past ``remove_after_s``.

        Called by the queen's cleanup task every ``cleanup_interval_s``. If this call comes much
        later than that (the queen was stopped or its loop stalled), the queen was not listening,
        so every hive's silence is counted from now instead."""
        settings = self.settings
        result = SweepResult()
        now = self._clock()
        with self._lock:
            if self._last_sweep is not None and now - self._last_sweep > settings.stale_after_s:
                log.warning("the queen did not sweep for %.1fs (stalled or suspended); "
                            "restarting every hive's silence count", now - self._last_sweep)
                for entry in self._hives.values():
                    entry.received_at = max(entry.received_at, now - settings.cleanup_interval_s)
            self._last_sweep = now
            silent = {hive_id: now - entry.received_at for hive_id, entry in self._hives.items()}
            verdict = judge(silent, {h for h, e in self._hives.items() if e.stale}, settings,
                            holding=self._holding)
            self._holding, result.held = verdict.holding, verdict.held
            for hive_id in verdict.newly_stale:
                result.stale.append(HiveStaleEvent(
                    hive_id=hive_id, silent_s=round(silent[hive_id], 3), timestamp=utc_now()))
            for hive_id, entry in self._hives.items():
                entry.stale = hive_id in verdict.stale
            for hive_id in verdict.expired:
                result.removed.append(_removed(
                    hive_id, self._hives.pop(hive_id),
                    f"no heartbeat for {silent[hive_id]:.1f}s "
                    f"(remove_after_s: {settings.remove_after_s:g})"))
        return result

    # -- internals (callers hold the lock) -------------------------------------------------

    def _entry(self, hive_id: str) -> _HiveEntry:
        try:
            return self._hives[hive_id]
        except KeyError:
            raise NotFoundError(f"unknown hive {hive_id!r}") from None

    def _state(self, hive_id: str, entry: _HiveEntry, now: float) -> HiveState:
        return HiveState(hive=entry.info, stale=entry.stale,
                         silent_s=round(max(0.0, now - entry.received_at), 3),
                         last_heartbeat=entry.last_heartbeat, workers=list(entry.workers),
                         capabilities=list(entry.capabilities))

    def _fleet_workers(self, *, with_vram: bool = True) -> Iterator[FleetWorker]:
        skip_unhealthy = self.settings.skip_unhealthy_gpus
        for hive_id, entry in sorted(self._hives.items()):
            schedulable = entry.schedulable
            vram = _HiveVram(entry) if with_vram else None
            unhealthy = {d.uuid for d in entry.capabilities if isinstance(d.health, Unhealthy)}
            for worker in entry.workers:
                on_unhealthy = _unhealthy_gpus_of(worker, entry.capabilities, unhealthy)
                yield FleetWorker(
                    hive_id=hive_id, hive_stale=entry.stale,
                    schedulable=(schedulable and worker.state is WorkerState.RUNNING
                                 and not (skip_unhealthy and on_unhealthy)),
                    worker=worker, vram=vram.of(worker) if vram is not None else None,
                    unhealthy_gpus=on_unhealthy)


def _removed(hive_id: str, entry: _HiveEntry, reason: str) -> HiveRemovedEvent:
    return HiveRemovedEvent(hive_id=hive_id, reason=reason, timestamp=utc_now(),
                            worker_ids=[worker_id(hive_id, w) for w in entry.workers])


def _unhealthy_gpus_of(worker: WorkerTelemetry, devices: list[GpuDevice],
                       unhealthy: set[str]) -> list[str]:
    if not unhealthy:
        return []
    if worker.gpus:
        return sorted({use.uuid for use in worker.gpus} & unhealthy)
    return sorted(d.uuid for d in devices  # an older hive: by index
                  if d.uuid in unhealthy and d.index in worker.gpu_indices)


class _HiveVram:
    """One hive's GPUs and what its workers hold on each, computed once per query (linear in the
    number of workers). Devices are keyed by UUID, so MIG instances of one GPU stay apart. A worker
    reports what it holds on each GPU (``gpus``); only a worker from an older hive that sends its
    total alone is counted as holding an equal share on each of its GPUs."""

    def __init__(self, entry: _HiveEntry) -> None:
        self.devices = {device.uuid: device for device in entry.capabilities}
        self.by_index: dict[int, list[str]] = {}
        for device in entry.capabilities:
            self.by_index.setdefault(device.index, []).append(device.uuid)
        self.claimed: dict[str, float] = {}
        for worker in entry.workers:
            for uuid, held in self._held(worker):
                self.claimed[uuid] = self.claimed.get(uuid, 0.0) + held

    def _held(self, worker: WorkerTelemetry) -> list[tuple[str, float]]:
        if worker.gpus:
            return [(use.uuid, use.vram_mb or 0.0) for use in worker.gpus]
        uuids = [u for i in worker.gpu_indices for u in self.by_index.get(i, ())[:1]]
        return [(u, worker.vram_mb / len(uuids)) for u in uuids]

    def of(self, worker: WorkerTelemetry) -> VramFigures | None:
        devices = self.devices
        uuids = [uuid for uuid, _ in self._held(worker)]
        if uuids and all(u in devices for u in uuids) and (
                worker.gpus or len(uuids) == len(worker.gpu_indices)):
            return VramFigures(
                gpu_indices=list(worker.gpu_indices),
                total_mb=sum(devices[u].vram_total_mb for u in uuids),
                free_mb=sum(devices[u].vram_free_mb for u in uuids),
                claimed_mb=round(sum(self.claimed[u] for u in uuids), 1), measured=True)
        if worker.total_vram_mb > 0:
            return VramFigures(gpu_indices=list(worker.gpu_indices), total_mb=worker.total_vram_mb,
                               free_mb=max(0.0, worker.total_vram_mb - worker.vram_mb),
                               claimed_mb=worker.vram_mb, measured=False)
        return None
