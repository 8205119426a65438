"""The live stream (``GET /v1/heartbeats/stream``): every SSE event is named ``heartbeat``; its
data is one of these, told apart by ``type``. ``hive_telemetry`` and ``queen`` keep the original
system's shapes; the others are ours."""

from __future__ import annotations

import msgspec

from .bounds import NonNegFloat, NonNegInt, UtcTimestamp
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


StreamEvent = (HiveTelemetryEvent | QueenEvent | HiveStaleEvent | HiveRemovedEvent | SnapshotEvent
               | LaggedEvent)
STREAM_EVENT_NAME = "heartbeat"
