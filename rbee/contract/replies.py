"""What the queen and the hive answer over HTTP, beside the stream: the shapes a client (the CLI,
a scheduler, the dashboard) decodes, so a client needs nothing from the servers' modules.

``HiveRecord`` is the domain record both servers keep of one hive (registry, history, metrics,
the hive's own ``/metrics``); it is a dataclass of contract structs, never sent as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .messages import GpuDevice, HealthStatus, HiveInfo, OperationalStatus, WorkerTelemetry


def worker_id(hive_id: str, worker: WorkerTelemetry) -> str:
    """A worker's fleet-wide id: ``hive/group/instance``."""
    return f"{hive_id}/{worker.group}/{worker.instance}"


@dataclass(frozen=True, slots=True)
class HiveRecord:
    """One hive as a scrape sees it (the structs are never mutated once stored)."""

    info: HiveInfo
    workers: list[WorkerTelemetry]
    gpus: list[GpuDevice]
    stale: bool = False
    silent_s: float = 0.0


class Reply(msgspec.Struct, kw_only=True):
    """Every answer that is not data: ``{"status": "ok" | "error", "message": ...}``."""

    status: str
    message: str


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
    """One worker as the queen sees it (``GET /v1/workers``): where it runs, whether it may be
    scheduled, its VRAM."""

    hive_id: str
    hive_stale: bool
    schedulable: bool
    worker: WorkerTelemetry
    idle: bool = False
    """Schedulable and idle (``rbee/queen/registry.py``'s ``is_idle``): the one meaning of idle.
    The stream's ``idle`` lists, the ``queen`` event's ``workers_available``, ``?idle=true``, the
    CLI and the dashboard all show this figure; none of them computes its own."""
    vram: VramFigures | None = None
    unhealthy_gpus: list[str] = []
    """UUIDs of the worker's GPUs whose health is unhealthy (skipped by scheduling queries when
    ``registry.skip_unhealthy_gpus``)."""

    @property
    def id(self) -> str:
        return worker_id(self.hive_id, self.worker)


class WorkerPage(msgspec.Struct, kw_only=True):
    """One page of a worker listing, in worker id order (hive, group, instance)."""

    workers: list[FleetWorker]
    next_after: str | None
    """The cursor of the next page (the last worker id here) when this page is full; None when
    the listing ended. A full page may be followed by an empty one."""


class QueenHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The queen's ``GET /health``."""

    status: str
    version: str
    hives: int
    stream_clients: int
    store: str = "memory"
    sweeping: bool | None = None
    """With a shared store: whether this queen holds the sweeper's lease."""
    problem: str | None = None
    """Why the queen is degraded: its store cannot be reached (it still serves what it has)."""


class QueenLink(msgspec.Struct, kw_only=True):
    """A hive's link to its queen, as its ``/health`` reports it."""

    url: str
    reachable: bool
    delivered: int
    failed: int
    """Sends that failed since the hive started (each one retried)."""
    last_problem: str


class HiveHealth(msgspec.Struct, kw_only=True):
    """The hive's ``GET /health``."""

    status: str
    hive_id: str
    operational_status: OperationalStatus
    health_status: HealthStatus
    cgroup_backend: str
    workers: int
    queen: QueenLink


class SeriesData(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One series in a ``/v1/history`` answer: its labels, its metric, one value per column."""

    hive: str
    metric: str
    values: list[float | None]
    group: str | None = None
    instance: str | None = None
    gpu: str | None = None
    """The GPU's (or MIG instance's) UUID."""
    gpu_index: int | None = None


class HistoryAnswer(msgspec.Struct, kw_only=True):
    """The queen's ``GET /v1/history``: aligned columns of past figures."""

    start: float
    """Unix time of the first column."""
    step: float
    timestamps: list[float]
    series: list[SeriesData]
    adjusted: list[str] = []
    """What was changed from the request to fit what is stored (step, window), and why."""


class PickedWorker(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One worker a pick offers (``GET /v1/pick``), with the figures it was ranked by and
    their ages, so a router can judge them itself."""

    hive_id: str
    group: str
    instance: str
    endpoint: str
    """Where to send the request (the worker's ``endpoint``)."""
    score: float
    """Its expected load, from ``pick.weights`` (lower is better; docs/pick.md)."""
    requests_running: int | None
    requests_waiting: int | None
    kv_cache_pct: float | None
    in_flight: int
    """Picks of it not yet seen in its engine's counters (this one included if it is first)."""
    engine_age_ms: float | None
    """Age of the engine figures (from ``sampled_at``); None without an engine state."""
    heartbeat_age_ms: float
    """Time since the queen received the heartbeat that carried them."""
    stale: bool = False
    """Its figures are older than ``pick.stale_after_ms`` (or unknown): ranked as saturated."""


class PickAnswer(msgspec.Struct, kw_only=True):
    """The queen's ``GET /v1/pick``: the best workers of a model, best first. The first is the
    pick (counted in flight on its worker); the others are fallbacks."""

    model: str
    picked: list[PickedWorker]
    candidates: int
    """Workers that matched: schedulable, running, with an endpoint, serving the model, passing
    the filters."""
    skipped_stale: int = 0
    """Candidates left out as stale (``pick.stale: skip``)."""
    all_stale: bool = False
    """Every candidate was stale and the answer is given anyway (``pick.all_stale: fail_open``)."""
