"""The messages a hive sends: its workers' telemetry, its GPUs and their health, its heartbeat.

JSON field names and units of the original system are kept (``cpu_pct``, ``rss_mb``,
``io_r_mb_s`` …) so its consumers can read ours; every field added since has a default and is left
out of the JSON while it holds that default, which keeps a 100-worker heartbeat small. Evolve only
by adding defaulted fields; never change a field's type.

Every struct is ``gc=False``: messages are trees, never cycles, and a queen holding thousands of
workers would otherwise have the cyclic GC walk them all on every full collection.

Units: ``*_mb`` are MiB (2**20 bytes), ``*_mb_s`` MiB per second, ``*_pct`` percent of one CPU core
(200.0 = two cores busy) or of one GPU. Bounds: ``rbee/contract/bounds.py``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from .bounds import (
    MAX_ERRORS,
    MAX_FIGURE,
    MAX_GPUS,
    MAX_METRICS,
    MAX_WORKERS,
    METRIC_KEY_CHARS,
    MIB,
    EndpointUrl,
    GpuIndex,
    Identifier,
    LongText,
    Metrics,
    NonNegFloat,
    NonNegInt,
    Pid,
    ShortText,
    SignedFloat,
    UtcTimestamp,
    WholeMib,
    WorkerName,
)


class WorkerState(enum.StrEnum):
    """Where a worker the hive keeps is in its life. Only ``running`` takes work.

    ``starting``: its process runs but the hive has not measured it over a whole rate window yet
    (``collect.rate_window_s``). ``running``: measured and up. ``backoff``: its process exited and
    the hive starts it again at ``next_attempt_at`` (its restart policy). ``crashloop``: like
    backoff, after ``crashloop_after`` failures in a row, each within ``restart_backoff_max_s``
    of its start: the hive now waits the longest backoff (``restart_backoff_max_s``) between
    attempts. ``exited``: its process exited and is not restarted (policy, or a stop).
    ``oom_killed``: the same, its last process killed by the OOM killer. ``last_exit`` says how
    it last ended, in every state."""

    RUNNING = "running"
    EXITED = "exited"
    STARTING = "starting"
    BACKOFF = "backoff"
    CRASHLOOP = "crashloop"
    OOM_KILLED = "oom_killed"


class OperationalStatus(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


class CollectorIssue(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """One collector's failure for one worker (or a figure one GPU cannot give); the rest of the
    record is still valid."""

    collector: ShortText
    message: LongText


class EngineState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A worker's inference engine as its own metrics endpoint reports it (vLLM, SGLang, TGI,
    llama.cpp). A figure the engine does not publish, or that needs two readings (rates, the
    time-to-first-token percentiles over ``collect.engine.ttft_window_s``), is None."""

    engine: ShortText
    """``vllm``, ``sglang``, ``tgi`` or ``llamacpp``."""
    version: ShortText | None = None
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
    sampled_at: UtcTimestamp | None = None
    """When the hive read the scheduling figures (running, waiting, KV cache) from the engine:
    their age is a reader's clock minus this. Absent from hives that do not say."""


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

    index: GpuIndex
    """The GPU's index on its hive; for a MIG instance, its parent GPU's."""
    uuid: ShortText
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


MAX_TAIL_LINES = 8
TAIL_LINE_CHARS = 160
TAIL_BYTES = 640
"""The last lines of a worker's stderr a heartbeat carries: at most 8 lines of 160 characters and
640 bytes (UTF-8) in all, so 100 crash-looping workers still fit a heartbeat."""
TailLine = Annotated[str, msgspec.Meta(max_length=TAIL_LINE_CHARS)]


class WorkerExit(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """How a worker's process last ended."""

    at: UtcTimestamp
    pid: Pid
    exit_code: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    """Its exit status, when it exited on its own; None when a signal ended it, or when it was
    not the hive's child (re-adopted after a hive restart: the status is the kernel's to give)."""
    signal: ShortText | None = None
    """The signal that ended it (``SIGKILL``, ``SIGSEGV``), if one did."""
    oom_killed: bool = False
    """The OOM killer ended it: its cgroup's ``oom_kill`` count rose and it died of SIGKILL."""
    ran_s: NonNegFloat = 0.0
    stderr_tail: Annotated[list[TailLine], msgspec.Meta(max_length=MAX_TAIL_LINES)] = []
    """The last lines it wrote to stderr (to its log file with ``log_dir``: stdout included)."""


class WorkerTelemetry(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One worker as seen at one sample.

    The first twelve fields are the original record and are always present, with its types:
    ``rss_mb``, ``vram_mb``, ``total_vram_mb`` and ``uptime_s`` are whole numbers (the original's
    ``u64``; a float from an older hive is rounded when decoded), ``rss_bytes`` keeps the finer
    figure. Rates (``cpu_pct``, ``io_*_mb_s``) are deltas between two samples: on a worker's first
    sample they are 0.0 and ``rate_window_s`` is 0.0, so a reader can tell "not measured yet"
    from "idle".
    """

    pid: Pid
    group: WorkerName
    instance: WorkerName
    cpu_pct: NonNegFloat
    rss_mb: WholeMib
    io_r_mb_s: NonNegFloat
    io_w_mb_s: NonNegFloat
    uptime_s: NonNegInt
    gpu_util_pct: NonNegFloat | None
    """Sum over its GPUs of ``gpus[].util_pct`` (percent of one GPU). ``None`` when the driver
    gives no figure for one of them: unknown is never reported as 0 (idle)."""
    vram_mb: WholeMib
    total_vram_mb: WholeMib
    model: ShortText | None

    state: WorkerState = WorkerState.RUNNING
    rate_window_s: NonNegFloat = 0.0
    memory_mb: NonNegFloat = 0.0
    """Everything the cgroup charges (memory.current / usage_in_bytes), page cache included."""
    gpu_indices: Annotated[list[GpuIndex], msgspec.Meta(max_length=MAX_GPUS)] = []
    cpu_limit_pct: NonNegFloat | None = None
    memory_limit_mb: NonNegFloat | None = None
    limits_applied: bool = True
    """False when the hive runs without cgroups and the requested limits are not enforced."""
    errors: Annotated[list[CollectorIssue], msgspec.Meta(max_length=MAX_ERRORS)] = []
    metrics: Metrics = {}
    """Numbers contributed by third-party collector plugins, keyed ``plugin.metric``."""
    gpu_util_source: GpuUtilSource | None = None
    """Whose figure ``gpu_util_pct`` is; ``device`` if any of its GPUs gave only a device figure.
    Absent for a worker on no GPU."""
    gpus: Annotated[list[WorkerGpuUse], msgspec.Meta(max_length=MAX_GPUS)] = []
    """Per GPU (or MIG instance) the worker's processes run on, or that CUDA_VISIBLE_DEVICES
    gives it before it allocates anything."""
    rss_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_FIGURE * MIB)] = 0
    """``rss_mb`` to the byte (0: not measured)."""
    engine: EngineState | None = None
    """The worker's inference engine, from its own metrics; None when unknown or unreadable."""
    restarts: NonNegInt = 0
    """How often the hive has started this worker again after its process ended."""
    oom_kills: NonNegInt = 0
    """Processes of this worker the OOM killer ended, over all its restarts (a counter): from its
    cgroup's ``memory.events`` (v2) or ``memory.oom_control`` (v1) ``oom_kill``."""
    last_exit: WorkerExit | None = None
    next_attempt_at: UtcTimestamp | None = None
    """When the hive starts it again (states ``backoff`` and ``crashloop``)."""
    endpoint: EndpointUrl | None = None
    """Where to send this worker's inference requests (``http://host:port``, a path allowed):
    its spawn spec's ``endpoint``, ``{port}`` made concrete. None when the hive does not know."""


def on_gpu(worker: WorkerTelemetry) -> bool:
    """Whether the worker runs on (or was given) a GPU. For one that is not, GPU figures are
    absent, never 0: ``gpu_util_pct`` is None and ``vram_mb``/``total_vram_mb`` (whole numbers
    in the original record, so always present) mean nothing and are shown as absent."""
    return bool(worker.gpus or worker.gpu_indices)


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
    detail: LongText
    fatal: bool
    """True: work on this GPU is at risk (data lost, reset needed), so the GPU is unhealthy and
    scheduling skips it. False: it runs, slower (clock throttling) — degraded."""


class Healthy(msgspec.Struct, tag_field="status", tag="healthy", frozen=True, gc=False):
    pass


class Degraded(msgspec.Struct, tag_field="status", tag="degraded", frozen=True, gc=False):
    reason: LongText


class Unhealthy(msgspec.Struct, tag_field="status", tag="unhealthy", frozen=True, gc=False):
    reason: LongText


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

    index: GpuIndex
    """The GPU's index; for a MIG instance, its parent GPU's (``uuid`` tells instances apart)."""
    uuid: ShortText
    name: ShortText
    util_pct: NonNegFloat | None
    vram_total_mb: NonNegFloat
    vram_used_mb: NonNegFloat
    vram_free_mb: NonNegFloat
    temperature_c: SignedFloat | None = None
    power_w: NonNegFloat | None = None
    mem_util_pct: NonNegFloat | None = None
    sample_age_s: NonNegFloat = 0.0
    """Age of these figures when the heartbeat was built."""
    health: HealthStatus = Healthy()
    faults: Annotated[list[GpuFault], msgspec.Meta(max_length=MAX_ERRORS)] = []
    errors: Annotated[list[CollectorIssue], msgspec.Meta(max_length=MAX_ERRORS)] = []
    mig_parent_uuid: ShortText | None = None
    """Set on a MIG instance: the physical GPU it is carved from. A GPU in MIG mode is reported
    as its instances (each with its own memory), not as itself."""
    mig_instance_id: NonNegInt | None = None
    """The GPU instance id of a MIG instance on its parent."""


class MetricKind(enum.StrEnum):
    GAUGE = "gauge"
    COUNTER = "counter"


PLUGIN_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""A plugin metric's name (after ``<plugin>.``) and unit: a piece of a Prometheus name."""
MAX_PLUGINS = 64
"""Plugins one heartbeat describes."""


class MetricSpec(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True, gc=False):
    """One figure a plugin puts in ``WorkerTelemetry.metrics`` (as ``<plugin>.<name>``), declared
    so that ``/metrics`` can give it its own family, help text and unit. A counter with
    ``as_rate`` is turned into a per-second rate by the hive (over ``collect.rate_window_s``, as
    the built-in rates), so the record carries the rate and the plugin only reads its counter."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=METRIC_KEY_CHARS,
                                      pattern=PLUGIN_NAME_PATTERN)]
    kind: MetricKind = MetricKind.GAUGE
    unit: Annotated[str, msgspec.Meta(max_length=32, pattern=r"^[a-z_]*$")] = ""
    """Prometheus' base units where there is one (``bytes``, ``seconds``, ``ratio``); empty for
    a count."""
    help: ShortText = ""
    as_rate: bool = False


class PluginInfo(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True, gc=False):
    """A third-party plugin a hive runs: its entry-point name, its distribution and version, and
    the figures it declares."""

    name: ShortText
    distribution: ShortText = ""
    version: ShortText = ""
    metrics: Annotated[list[MetricSpec], msgspec.Meta(max_length=MAX_METRICS)] = []


class HiveInfo(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    id: Identifier
    hostname: ShortText
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    operational_status: OperationalStatus
    health_status: HealthStatus
    version: ShortText
    plugins: Annotated[list[PluginInfo], msgspec.Meta(max_length=MAX_PLUGINS)] = []
    """Its third-party plugins and their declared figures. An older hive sends none: the queen
    then shows its plugin figures as undeclared (``rbee_plugin_metric``)."""


class HiveHeartbeat(msgspec.Struct, kw_only=True, gc=False):
    """Everything the queen needs from one hive, sent whole every interval (never a diff), so that a
    lost heartbeat costs nothing and a restarted queen is whole again after one."""

    hive: HiveInfo
    timestamp: UtcTimestamp
    workers: Annotated[list[WorkerTelemetry], msgspec.Meta(max_length=MAX_WORKERS)]
    capabilities: Annotated[list[GpuDevice], msgspec.Meta(max_length=MAX_GPUS)] = []


def utc_now() -> datetime:
    return datetime.now(UTC)
