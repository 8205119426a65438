"""The telemetry contract: the typed messages a hive sends and the queen stores and streams.

One module, used by both sides, so they cannot drift. JSON field names and units of the original
system are kept (``cpu_pct``, ``rss_mb``, ``io_r_mb_s`` …) so its consumers can read ours; every field
added since has a default and is left out of the JSON while it holds that default, which keeps a
100-worker heartbeat small. Evolve only by adding defaulted fields; never change a field's type.

Every struct is ``gc=False``: messages are trees, never cycles, and a queen holding thousands of
workers would otherwise have the cyclic GC walk them all on every full collection.

Units: ``*_mb`` are MiB (2**20 bytes), ``*_mb_s`` MiB per second, ``*_pct`` percent of one CPU core
(200.0 = two cores busy) or of one GPU.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from ._errors import ContractError

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
UtcTimestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class WorkerState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"


class OperationalStatus(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


class CollectorIssue(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One collector's failure for one worker (or a figure one GPU cannot give); the rest of the
    record is still valid."""

    collector: str
    message: str


class EngineState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A worker's inference engine as its own metrics endpoint reports it (vLLM, SGLang, TGI,
    llama.cpp). A figure the engine does not publish, or that needs two readings (rates, the
    time-to-first-token percentiles over ``collect.engine.ttft_window_s``), is None."""

    engine: str
    """``vllm``, ``sglang``, ``tgi`` or ``llamacpp``."""
    version: str | None = None
    requests_running: NonNegInt
    requests_waiting: NonNegInt
    """Requests queued in the engine, not yet scheduled."""
    kv_cache_pct: NonNegFloat | None = None
    """Share of the engine's KV cache in use, 0..100."""
    prompt_tokens_s: NonNegFloat | None = None
    generation_tokens_s: NonNegFloat | None = None
    ttft_p50_s: NonNegFloat | None = None
    ttft_p95_s: NonNegFloat | None = None
    preemptions_s: NonNegFloat | None = None
    rate_window_s: NonNegFloat = 0.0
    """Seconds between the two readings behind the rates; 0.0 until there are two."""


class GpuUtilSource(enum.StrEnum):
    """Where a worker's GPU utilisation comes from, so no scheduler mistakes one for the other."""

    PROCESS = "process"
    """The worker's own processes' samples (NVML per-process utilisation) since the last tick:
    a process with no newer sample did not run on the GPU, and counts 0."""
    DEVICE = "device"
    """The whole device's figure, every process on it included: per-process utilisation is not
    supported there (nvidia-smi, some drivers). An upper bound for the worker, not its own use."""


class WorkerGpuUse(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """What one worker uses of one GPU (or MIG instance): its processes' VRAM and utilisation
    there, measured per GPU, never an equal share of a total. ``None`` is "the driver does not
    say" (the reason is in the worker's ``errors``), never 0."""

    index: NonNegInt
    """The GPU's index on its hive; for a MIG instance, its parent GPU's."""
    uuid: str
    """The device the processes run on: ``GPU-…``, or ``MIG-…`` for a MIG instance."""
    vram_mb: NonNegFloat | None
    util_pct: NonNegFloat | None
    """SM utilisation, averaged over the samples of ``util_window_s`` (``util_source`` says whose)."""
    mem_util_pct: NonNegFloat | None = None
    """Memory-bandwidth utilisation over the same samples."""
    util_source: GpuUtilSource | None = None
    util_window_s: NonNegFloat = 0.0
    """The span the utilisation covers: the time between two per-process queries (one tick), or
    the driver's own averaging period for a device figure (1/6 s to 1 s, driver-chosen)."""
    sample_age_s: NonNegFloat = 0.0
    """Age of the utilisation figure when this record was built."""


class WorkerTelemetry(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One worker as seen at one sample.

    The first twelve fields are the original record and are always present. Rates (``cpu_pct``,
    ``io_*_mb_s``) are deltas between two samples: on a worker's first sample they are 0.0 and
    ``rate_window_s`` is 0.0, so a reader can tell "not measured yet" from "idle".
    """

    pid: NonNegInt
    group: Name
    instance: Name
    cpu_pct: NonNegFloat
    rss_mb: NonNegFloat
    io_r_mb_s: NonNegFloat
    io_w_mb_s: NonNegFloat
    uptime_s: NonNegInt
    gpu_util_pct: NonNegFloat | None
    """Sum over its GPUs of ``gpus[].util_pct`` (percent of one GPU). ``None`` when the driver
    gives no figure for one of them: unknown is never reported as 0 (idle)."""
    vram_mb: NonNegFloat
    total_vram_mb: NonNegFloat
    model: str | None

    state: WorkerState = WorkerState.RUNNING
    rate_window_s: NonNegFloat = 0.0
    memory_mb: NonNegFloat = 0.0
    """Everything the cgroup charges (memory.current / usage_in_bytes), page cache included."""
    gpu_indices: list[NonNegInt] = []
    cpu_limit_pct: NonNegFloat | None = None
    memory_limit_mb: NonNegFloat | None = None
    limits_applied: bool = True
    """False when the hive runs without cgroups and the requested limits are not enforced."""
    errors: list[CollectorIssue] = []
    metrics: dict[str, float] = {}
    """Numbers contributed by third-party collector plugins, keyed ``plugin.metric``."""
    gpu_util_source: GpuUtilSource | None = None
    """Whose figure ``gpu_util_pct`` is; ``device`` if any of its GPUs gave only a device figure.
    Absent for a worker on no GPU."""
    gpus: list[WorkerGpuUse] = []
    """Per GPU (or MIG instance) the worker's processes run on, or that CUDA_VISIBLE_DEVICES
    gives it before it allocates anything."""
    engine: EngineState | None = None
    """The worker's inference engine, from its own metrics; None when unknown or unreadable."""


class GpuFaultKind(enum.StrEnum):
    """The checks DCGM's health watches make, as NVML exposes them."""

    ECC_UNCORRECTED = "ecc_uncorrected"
    """Uncorrected (double-bit) ECC errors since the driver loaded: data was lost."""
    RETIRED_PAGES_PENDING = "retired_pages_pending"
    """Pages waiting to be retired (pre-Ampere): the GPU needs a reset."""
    REMAPPED_ROWS_PENDING = "remapped_rows_pending"
    """Rows waiting to be remapped (Ampere and later): the GPU needs a reset."""
    ROW_REMAP_FAILURE = "row_remap_failure"
    """A row could not be remapped: the GPU should be replaced."""
    THERMAL_SLOWDOWN = "thermal_slowdown"
    POWER_BRAKE = "power_brake"
    HW_SLOWDOWN = "hw_slowdown"
    XID = "xid"
    """An Xid error reported by the driver (NVML critical-error events)."""


class GpuFault(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    kind: GpuFaultKind
    detail: str
    fatal: bool
    """True: work on this GPU is at risk (data lost, reset needed), so the GPU is unhealthy and
    scheduling skips it. False: it runs, slower (clock throttling) — degraded."""


class Healthy(msgspec.Struct, tag_field="status", tag="healthy", frozen=True, gc=False):
    pass


class Degraded(msgspec.Struct, tag_field="status", tag="degraded", frozen=True, gc=False):
    reason: str


class Unhealthy(msgspec.Struct, tag_field="status", tag="unhealthy", frozen=True, gc=False):
    reason: str


HealthStatus = Healthy | Degraded | Unhealthy


def describe_health(status: HealthStatus) -> str:
    """``healthy``, or ``degraded: <reason>`` / ``unhealthy: <reason>``, for logs and tables."""
    tag = status.__struct_config__.tag
    return tag if isinstance(status, Healthy) else f"{tag}: {status.reason}"


def gpu_health(faults: list[GpuFault]) -> HealthStatus:
    """A GPU's health from its faults: unhealthy if any is fatal, degraded if any, else healthy."""
    if not faults:
        return Healthy()
    reason = "; ".join(f"{fault.kind}: {fault.detail}" for fault in faults)
    return Unhealthy(reason=reason) if any(f.fatal for f in faults) else Degraded(reason=reason)


class GpuDevice(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One GPU (or MIG instance) as its driver reports it; totals are read from the device, never
    assumed. A figure the driver does not support is ``None`` with the reason in ``errors``.

    ``util_pct`` and ``mem_util_pct`` are the driver's device-wide figures: the share of its
    sampling period (1/6 s to 1 s, driver-chosen) in which a kernel ran / memory was read or
    written. Short bursts between its samples can read 0; per-worker figures come from
    per-process samples instead (``WorkerGpuUse``)."""

    index: NonNegInt
    """The GPU's index; for a MIG instance, its parent GPU's (``uuid`` tells instances apart)."""
    uuid: str
    name: str
    util_pct: NonNegFloat | None
    vram_total_mb: NonNegFloat
    vram_used_mb: NonNegFloat
    vram_free_mb: NonNegFloat
    temperature_c: float | None = None
    power_w: NonNegFloat | None = None
    mem_util_pct: NonNegFloat | None = None
    sample_age_s: NonNegFloat = 0.0
    """Age of these figures when the heartbeat was built."""
    health: HealthStatus = Healthy()
    faults: list[GpuFault] = []
    errors: list[CollectorIssue] = []
    mig_parent_uuid: str | None = None
    """Set on a MIG instance: the physical GPU it is carved from. A GPU in MIG mode is reported
    as its instances (each with its own memory), not as itself."""
    mig_instance_id: NonNegInt | None = None
    """The GPU instance id of a MIG instance on its parent."""


class HiveInfo(msgspec.Struct, kw_only=True, gc=False):
    id: Name
    hostname: str
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    operational_status: OperationalStatus
    health_status: HealthStatus
    version: str


class HiveHeartbeat(msgspec.Struct, kw_only=True, gc=False):
    """Everything the queen needs from one hive, sent whole every interval (never a diff), so that a
    lost heartbeat costs nothing and a restarted queen is whole again after one."""

    hive: HiveInfo
    timestamp: UtcTimestamp
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice] = []


# -- the live stream (GET /v1/heartbeats/stream) ----------------------------------------------
# Every SSE event is named ``heartbeat``; its data is one of these, told apart by ``type``.
# ``hive_telemetry`` and ``queen`` keep the original system's shapes; the others are ours.


class HiveTelemetryEvent(msgspec.Struct, kw_only=True, tag_field="type", tag="hive_telemetry", gc=False):
    """Forwarded for every heartbeat the queen accepts: the hive's whole worker list."""

    hive_id: str
    timestamp: UtcTimestamp
    """The hive's own clock at sending, as it reported it."""
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice] = []
    """Its GPUs with their health, as in the heartbeat."""
    health_status: HealthStatus | None = None


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


def utc_now() -> datetime:
    return datetime.now(UTC)


_heartbeat_decoder = msgspec.json.Decoder(HiveHeartbeat)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of any contract struct."""
    return _encoder.encode(message)


_stream_event_decoder = msgspec.json.Decoder(StreamEvent)


def decode_stream_event(payload: bytes | str) -> StreamEvent:
    """Parse the data of one stream event. Raises ContractError naming the offending field."""
    try:
        return _stream_event_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractError(f"invalid stream event: {exc}") from exc


def decode_heartbeat(payload: bytes | str) -> HiveHeartbeat:
    """Parse and validate a heartbeat. Raises ContractError naming the offending field."""
    try:
        return _heartbeat_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractError(f"invalid heartbeat: {exc}") from exc
