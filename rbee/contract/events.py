"""The live stream (``GET /v1/heartbeats/stream``): every SSE event is named ``heartbeat``; its
data is one of these, told apart by ``type``. ``hive_telemetry`` and ``queen`` keep the original
system's shapes; the others are ours."""

from __future__ import annotations

from typing import get_type_hints

import msgspec

from .bounds import NonNegFloat, NonNegInt, ShortText, UtcTimestamp
from .messages import GpuDevice, HealthStatus, HiveInfo, WorkerTelemetry


class HiveTelemetryEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="hive_telemetry", gc=False):
    """Forwarded for every heartbeat the queen accepts: the hive's whole worker list."""

    hive_id: str
    timestamp: UtcTimestamp
    """The hive's own clock at sending, as it reported it."""
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice] = []
    """Its GPUs with their health, as in the heartbeat."""
    health_status: HealthStatus | None = None
    idle: list[str] = []
    """``group/instance`` of its idle workers, judged by the queen (schedulable, and no request
    in the engine or, with no engine state, a GPU at or under ``registry.idle_gpu_util_pct``):
    the one meaning of idle, which readers show rather than recompute."""


class FleetSummary(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Totals over the online workers, as the dashboard's header shows them."""

    workers_total: NonNegInt = 0
    """Every worker the registry holds, stale hives' included."""
    workers_busy: NonNegInt = 0
    """Online workers with a request in their engine (running > 0)."""
    requests_running: NonNegInt = 0
    requests_waiting: NonNegInt = 0
    """Summed over the online workers' engines."""
    cpu_pct: NonNegFloat = 0.0
    rss_mb: NonNegInt = 0
    vram_mb: NonNegInt = 0
    """Summed over the online workers."""
    gpus: NonNegInt = 0
    gpus_unhealthy: NonNegInt = 0
    """The online hives' GPUs, and those of them whose health is not ``ok``."""
    models: dict[ShortText, NonNegInt] = {}
    """Online workers per model (workers without a model are not counted)."""
    states: dict[str, NonNegInt] = {}
    """Online workers per ``WorkerState``."""


class QueenEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="queen", gc=False):
    """The fleet summary, sent every ``stream.queen_interval_s``. Online means not stale;
    available means schedulable (a ready, not unhealthy hive; for workers, also idle)."""

    workers_online: NonNegInt
    workers_available: NonNegInt
    hives_online: NonNegInt
    hives_available: NonNegInt
    worker_ids: list[str]
    """``hive/group/instance`` of every online worker."""
    hive_ids: list[str]
    timestamp: UtcTimestamp
    summary: FleetSummary | None = None
    """The fleet's totals, computed by the queen so a view of thousands of workers need not add
    them up itself on every event (None from a queen older than the field)."""


class HiveStaleEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="hive_stale", gc=False):
    """A hive missed heartbeats: still shown, no longer scheduled. Its next heartbeat revives it."""

    hive_id: str
    silent_s: NonNegFloat
    timestamp: UtcTimestamp


class HiveRemovedEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="hive_removed", gc=False):
    """A hive and all its workers left the registry."""

    hive_id: str
    reason: str
    worker_ids: list[str]
    timestamp: UtcTimestamp


class HiveState(msgspec.Struct, kw_only=True, gc=False):
    """One hive as a snapshot shows it."""

    hive: HiveInfo
    stale: bool
    silent_s: NonNegFloat
    """Seconds since the queen last heard from it, by the queen's clock."""
    last_heartbeat: UtcTimestamp
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice] = []
    idle: list[str] = []
    """``group/instance`` of its idle workers, as in ``HiveTelemetryEvent.idle`` (none while
    stale)."""


class SnapshotEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="snapshot", gc=False):
    """The whole fleet at once: the first event of every connection, and the resync after a lag."""

    hives: list[HiveState]
    timestamp: UtcTimestamp


class LaggedEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="lagged", gc=False):
    """This client fell more than ``stream.client_buffer`` events behind; ``dropped`` events were
    skipped and a snapshot follows at once, so its view is whole again."""

    dropped: NonNegInt
    timestamp: UtcTimestamp


def _fields_of_a_worker() -> type[msgspec.Struct]:
    """``WorkerTelemetry``'s figures (all but ``group`` and ``instance``), each one optional: a
    field is present in ``WorkerUpdateEvent.fields`` only when it changed (``null`` is a value:
    an engine that became unknown)."""
    hints = get_type_hints(WorkerTelemetry, include_extras=True)
    return msgspec.defstruct(
        "WorkerFields",
        [(name, hints[name] | msgspec.UnsetType, msgspec.UNSET)
         for name in WorkerTelemetry.__struct_fields__ if name not in ("group", "instance")],
        kw_only=True, omit_defaults=True, gc=False, module=__name__)


WorkerFields = _fields_of_a_worker()


class WorkerUpdateEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="worker_update",
                        omit_defaults=True, gc=False):
    """What changed in one worker since the queen last saw it (a client asks for these with
    ``events=worker_update``): the figures that differ from the worker's previous record, the
    others left out. A worker the queen had not seen comes with all its figures; one that left
    its hive (or whose hive left) comes with ``removed`` set and no figures. All the updates of
    one heartbeat share its event id, which only the last of them carries."""

    hive_id: str
    group: str
    instance: str
    timestamp: UtcTimestamp
    """The hive's clock when it sampled these figures (its heartbeat's ``timestamp``); the
    engine's own figures carry their ``sampled_at`` inside ``fields.engine``."""
    fields: WorkerFields = msgspec.field(default_factory=WorkerFields)  # type: ignore[valid-type]
    removed: bool = False


StreamEvent = (HiveTelemetryEvent | QueenEvent | HiveStaleEvent | HiveRemovedEvent | SnapshotEvent
               | LaggedEvent | WorkerUpdateEvent)
STREAM_EVENTS = ("hive_telemetry", "worker_update", "queen", "hive_stale", "hive_removed")
"""The events a client may choose with ``events=`` (``snapshot`` and ``lagged`` always come)."""
DEFAULT_STREAM_EVENTS = ("hive_telemetry", "queen", "hive_stale", "hive_removed")
"""What a client that chooses none gets: every event but ``worker_update``."""
STREAM_EVENT_NAME = "heartbeat"
