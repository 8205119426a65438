"""rbee telemetry: per-worker telemetry of GPU inference fleets, from hive agents to a live queen.

The public surface is re-exported here; modules whose names start with ``_`` are private.
"""

from ._errors import (
    CgroupError,
    CollectorError,
    ConfigError,
    ContractError,
    LimitError,
    ListenError,
    NotFoundError,
    PluginError,
    RbeeError,
    SpawnError,
)
from .telemetry import (
    CollectorIssue,
    Degraded,
    EngineState,
    GpuDevice,
    GpuFault,
    GpuFaultKind,
    GpuUtilSource,
    Healthy,
    HiveHeartbeat,
    HiveInfo,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveState,
    HiveTelemetryEvent,
    LaggedEvent,
    OperationalStatus,
    QueenEvent,
    SnapshotEvent,
    StreamEvent,
    Unhealthy,
    WorkerGpuUse,
    WorkerState,
    WorkerTelemetry,
    decode_heartbeat,
    decode_stream_event,
    encode,
)

__version__ = "0.1.0"

__all__ = [
    # errors
    "CgroupError",
    "CollectorError",
    "ConfigError",
    "ContractError",
    "LimitError",
    "ListenError",
    "NotFoundError",
    "PluginError",
    "RbeeError",
    "SpawnError",
    # telemetry contract
    "CollectorIssue",
    "Degraded",
    "EngineState",
    "GpuDevice",
    "GpuFault",
    "GpuFaultKind",
    "GpuUtilSource",
    "Healthy",
    "HiveHeartbeat",
    "HiveInfo",
    "OperationalStatus",
    "Unhealthy",
    "WorkerGpuUse",
    "WorkerState",
    "WorkerTelemetry",
    "decode_heartbeat",
    "encode",
    # the live stream
    "HiveRemovedEvent",
    "HiveStaleEvent",
    "HiveState",
    "HiveTelemetryEvent",
    "LaggedEvent",
    "QueenEvent",
    "SnapshotEvent",
    "StreamEvent",
    "decode_stream_event",
]
