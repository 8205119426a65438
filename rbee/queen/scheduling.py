"""The scheduling rules of the queen, in one place: which hives and workers may be scheduled,
what idle means, what a worker query matches, and the VRAM figures a scheduler reads. The
registry applies them; the stream's ``idle`` lists come from them too (``idle_instances``)."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from ..config import RegistrySettings
from ..contract import (
    FleetWorker,
    GpuDevice,
    HiveHeartbeat,
    HiveInfo,
    OperationalStatus,
    Unhealthy,
    VramFigures,
    WorkerState,
    WorkerTelemetry,
)

SCHEDULABLE_STATUSES = frozenset({OperationalStatus.READY, OperationalStatus.BUSY})


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


class WorkerQuery(msgspec.Struct, kw_only=True, frozen=True):
    """What ``GET /v1/workers`` asks for. With no condition set, every worker (stale hives'
    included, flagged); with any, only schedulable workers matching all of them. ``max_waiting``
    and ``max_kv_cache_pct`` ask the worker's engine, so a worker whose engine state is unknown
    (or whose engine publishes no KV-cache figure) does not match them."""

    idle: bool = False
    model: str | None = None
    min_free_vram_mb: float | None = None
    max_waiting: int | None = None
    max_kv_cache_pct: float | None = None

    @property
    def filtered(self) -> bool:
        return self.idle or any(value is not None for value in (
            self.model, self.min_free_vram_mb, self.max_waiting, self.max_kv_cache_pct))

    def matches(self, found: FleetWorker) -> bool:
        if not self.filtered:
            return True
        worker, engine = found.worker, found.worker.engine
        return (found.schedulable
                and (not self.idle or found.idle)
                and (self.model is None or worker.model == self.model)
                and (self.min_free_vram_mb is None or (
                    found.vram is not None and found.vram.free_mb >= self.min_free_vram_mb))
                and (self.max_waiting is None or (
                    engine is not None and engine.requests_waiting <= self.max_waiting))
                and (self.max_kv_cache_pct is None or (
                    engine is not None and engine.kv_cache_pct is not None
                    and engine.kv_cache_pct <= self.max_kv_cache_pct)))


EVERY_WORKER = WorkerQuery()


def parse_worker_id(text: str) -> tuple[str, str, str]:
    """``hive/group/instance`` as a sort key; ValueError naming the text otherwise."""
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{text!r} is not a worker id (hive/group/instance)")
    return parts[0], parts[1], parts[2]


def hive_schedulable(info: HiveInfo, stale: bool) -> bool:
    """A hive whose workers may be scheduled: heard from lately, ready or busy, not unhealthy."""
    return (not stale and info.operational_status in SCHEDULABLE_STATUSES
            and not isinstance(info.health_status, Unhealthy))


def judged(workers: list[WorkerTelemetry], devices: list[GpuDevice], hive_schedulable: bool,
            settings: RegistrySettings, *, ordered: bool = True
            ) -> Iterator[tuple[WorkerTelemetry, list[str], bool, bool]]:
    """Each of a hive's workers (in (group, instance) order if ``ordered``), with the GPUs it runs
    on that are unhealthy, whether it is schedulable, and whether it is idle (schedulable and
    ``is_idle``)."""
    unhealthy = {d.uuid for d in devices if isinstance(d.health, Unhealthy)}
    for worker in sorted(workers, key=worker_key) if ordered else workers:
        on_unhealthy = unhealthy_gpus_of(worker, devices, unhealthy)
        schedulable = (hive_schedulable and worker.state is WorkerState.RUNNING
                       and not (settings.skip_unhealthy_gpus and on_unhealthy))
        yield (worker, on_unhealthy, schedulable,
               schedulable and is_idle(worker, settings.idle_gpu_util_pct))


def idle_workers(workers: list[WorkerTelemetry], devices: list[GpuDevice], hive_schedulable: bool,
                 settings: RegistrySettings) -> list[WorkerTelemetry]:
    """The idle ones of a hive's ``workers``, in their order: ``judged``'s rule, without its
    per-worker verdicts where no GPU is unhealthy (per heartbeat, on the ingest path)."""
    if not hive_schedulable:
        return []
    if any(isinstance(d.health, Unhealthy) for d in devices):
        return [worker for worker, _, _, idle in judged(
            workers, devices, True, settings, ordered=False) if idle]
    threshold, running = settings.idle_gpu_util_pct, WorkerState.RUNNING
    return [worker for worker in workers
            if worker.state is running and is_idle(worker, threshold)]


def idle_instances(heartbeat: HiveHeartbeat, settings: RegistrySettings) -> list[str]:
    """``group/instance`` of the idle workers of a hive just heard from (so not stale), by the
    same rule as the listings: what the stream's ``hive_telemetry`` event carries."""
    return [instance_key(worker) for worker in idle_workers(  # in the hive's order: no sort
        heartbeat.workers, heartbeat.capabilities, hive_schedulable(heartbeat.hive, False),
        settings)]


def instance_key(worker: WorkerTelemetry) -> str:
    return f"{worker.group}/{worker.instance}"


def worker_key(worker: WorkerTelemetry) -> tuple[str, str]:
    return worker.group, worker.instance


def fleet_key(found: FleetWorker) -> tuple[str, str]:
    return found.worker.group, found.worker.instance


NO_GPUS: list[str] = []
"""The one empty list every healthy worker's ``unhealthy_gpus`` shares (never mutated): one list
fewer per listed worker."""


def unhealthy_gpus_of(worker: WorkerTelemetry, devices: list[GpuDevice],
                       unhealthy: set[str]) -> list[str]:
    if not unhealthy:
        return NO_GPUS
    if worker.gpus:
        return sorted({use.uuid for use in worker.gpus} & unhealthy)
    return sorted(d.uuid for d in devices  # an older hive: by index
                  if d.uuid in unhealthy and d.index in worker.gpu_indices)


class HiveVram:
    """One hive's GPUs and what its workers hold on each, computed once per query (linear in the
    number of workers). Devices are keyed by UUID, so MIG instances of one GPU stay apart. A worker
    reports what it holds on each GPU (``gpus``); only a worker from an older hive that sends its
    total alone is counted as holding an equal share on each of its GPUs."""

    def __init__(self, capabilities: list[GpuDevice], workers: list[WorkerTelemetry]) -> None:
        self.devices = {device.uuid: device for device in capabilities}
        self.by_index: dict[int, list[str]] = {}
        for device in capabilities:
            self.by_index.setdefault(device.index, []).append(device.uuid)
        self.claimed: dict[str, float] = {}
        for worker in workers:
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
                gpu_indices=worker.gpu_indices,  # shared with the stored worker, never mutated
                total_mb=sum(devices[u].vram_total_mb for u in uuids),
                free_mb=sum(devices[u].vram_free_mb for u in uuids),
                claimed_mb=round(sum(self.claimed[u] for u in uuids), 1), measured=True)
        if worker.total_vram_mb > 0:
            return VramFigures(gpu_indices=worker.gpu_indices, total_mb=worker.total_vram_mb,
                               free_mb=max(0.0, worker.total_vram_mb - worker.vram_mb),
                               claimed_mb=worker.vram_mb, measured=False)
        return None
