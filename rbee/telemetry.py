"""The telemetry contract: the typed messages a hive sends and the queen stores and streams.

One module, used by both sides, so they cannot drift. JSON field names and units of the original
system are kept (``cpu_pct``, ``rss_mb``, ``io_r_mb_s`` …) so its consumers can read ours; every field
added since has a default and is left out of the JSON while it holds that default, which keeps a
100-worker heartbeat small. Evolve only by adding defaulted fields; never change a field's type.

Every struct is ``gc=False``: messages are trees, never cycles, and a queen holding thousands of
workers would otherwise have the cyclic GC walk them all on every full collection.

Units: ``*_mb`` are MiB (2**20 bytes), ``*_mb_s`` MiB per second, ``*_pct`` percent of one CPU core
(200.0 = two cores busy) or of one GPU.

Bounds. Whatever a client sends, what the queen keeps is bounded, so the decoder refuses (naming the
field) rather than stores: ids (hive id, group, instance) are 1-128 characters of ``[A-Za-z0-9_.-]``
starting with a letter or digit (no ``/``, so ``hive/group/instance`` is unambiguous and a hive id
is one URL path segment; no whitespace or control characters, so an id cannot forge a log line or
drive a terminal); free text is capped (``SHORT_TEXT_CHARS``, ``LONG_TEXT_CHARS``); plugin
``metrics`` are capped in count, key length and charset; every number is finite and at most
``MAX_FIGURE``, so a sum over the most workers and GPUs a heartbeat may carry stays finite; lists
are capped (``MAX_WORKERS`` and the queen's own ``registry.max_workers_per_hive``). A hive cuts
what it collects to these bounds (``fit_worker``) before sending, so its heartbeats always decode.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime
from operator import attrgetter
from typing import Annotated, TypeVar

import msgspec

from ._errors import ContractError

MIB = 2**20
MAX_FIGURE = 2**40
"""The largest value of any figure (MiB, MiB/s, percent, seconds): a mebibyte figure of 2**40 is
an exbibyte, and 4096 such figures still sum to an exact, finite float."""
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ID_MAX_CHARS = 128
SHORT_TEXT_CHARS = 256
"""Model, hostname, version, GPU name and UUID, collector name."""
LONG_TEXT_CHARS = 2048
"""An error message or a health reason."""
MAX_WORKERS = 4096
"""Workers in one heartbeat, whatever the queen's config; ``registry.max_workers_per_hive``
(1024 by default) is the cap a queen applies."""
MAX_GPUS = 256
"""GPUs in one heartbeat, and GPU indices of one worker."""
MAX_ERRORS = 32
"""Collector errors of one worker."""
MAX_METRICS = 64
"""Plugin metrics of one worker."""
METRIC_KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
METRIC_KEY_CHARS = 64

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_FIGURE)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_FIGURE)]
SignedFloat = Annotated[float, msgspec.Meta(ge=-MAX_FIGURE, le=MAX_FIGURE)]
WholeMib = Annotated[int, msgspec.Meta(ge=0, le=MAX_FIGURE)] | NonNegFloat
"""A MiB figure the original system types as an unsigned integer: sent as an integer, accepted as
a float too (older hives sent ``19.83``) and rounded on decoding."""
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**22)]
"""At most the kernel's largest ``pid_max``."""
GpuIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_GPUS)]
UtcTimestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS,
                                         pattern=ID_PATTERN)]
"""A hive id, a worker's group or instance."""
WorkerName = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS)]
"""A group or instance: an ``Identifier`` whose pattern ``decode_heartbeat`` checks through a
cache of names already seen (a regex per name would double the decoding time of a heartbeat, and
a fleet's names repeat every second)."""
ShortText = Annotated[str, msgspec.Meta(max_length=SHORT_TEXT_CHARS)]
LongText = Annotated[str, msgspec.Meta(max_length=LONG_TEXT_CHARS)]
MetricKey = Annotated[str, msgspec.Meta(min_length=1, max_length=METRIC_KEY_CHARS,
                                        pattern=METRIC_KEY_PATTERN)]
Metrics = Annotated[dict[MetricKey, SignedFloat], msgspec.Meta(max_length=MAX_METRICS)]


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


class HiveInfo(msgspec.Struct, kw_only=True, gc=False):
    id: Identifier
    hostname: ShortText
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    operational_status: OperationalStatus
    health_status: HealthStatus
    version: ShortText


class HiveHeartbeat(msgspec.Struct, kw_only=True, gc=False):
    """Everything the queen needs from one hive, sent whole every interval (never a diff), so that a
    lost heartbeat costs nothing and a restarted queen is whole again after one."""

    hive: HiveInfo
    timestamp: UtcTimestamp
    workers: Annotated[list[WorkerTelemetry], msgspec.Meta(max_length=MAX_WORKERS)]
    capabilities: Annotated[list[GpuDevice], msgspec.Meta(max_length=MAX_GPUS)] = []


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


def utc_now() -> datetime:
    return datetime.now(UTC)


_heartbeat_decoder = msgspec.json.Decoder(HiveHeartbeat)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of any contract struct."""
    return _encoder.encode(message)


_stream_event_decoder = msgspec.json.Decoder(StreamEvent)

T = TypeVar("T")


def decode_json(decoder: msgspec.json.Decoder[T], payload: bytes | str, what: str) -> T:
    """Decode ``payload`` with ``decoder``; every way the input can be wrong is a ContractError
    naming the problem (and the field, where there is one) in rbee's words, never another
    exception. The boundary maps the decoder's errors as httpx's ``map_exceptions`` does, so
    the words do not change with the decoder's release: invalid UTF-8 is a ``UnicodeDecodeError``
    up to msgspec 0.22 and a ``DecodeError("Invalid UTF-8 encoded string")`` from 0.23 on, and
    deep nesting is a RecursionError."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ContractError(f"invalid {what}: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"invalid {what}: {_not_utf8(payload) or exc}") from exc
    except RecursionError as exc:
        raise ContractError(f"invalid {what}: JSON nested too deeply") from exc


def _not_utf8(payload: bytes | str) -> str:
    """What is wrong if ``payload`` is not UTF-8 (JSON text must be), else "". Asked only once
    the decoder has failed, so a valid payload is never scanned twice."""
    if isinstance(payload, str):
        return ""
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        return f"not valid UTF-8 (byte {bad!r} at offset {exc.start})"
    return ""


def decode_stream_event(payload: bytes | str) -> StreamEvent:
    """Parse the data of one stream event. Raises ContractError naming the offending field."""
    return decode_json(_stream_event_decoder, payload, "stream event")


def decode_heartbeat(payload: bytes | str) -> HiveHeartbeat:
    """Parse and validate a heartbeat. Raises ContractError naming the offending field.

    Beyond what the types check: group and instance names match ``ID_PATTERN``, and the
    original's whole-number fields sent as floats (older hives) are rounded (``rss_bytes`` gets
    the finer figure), so what the queen stores and streams is integers."""
    heartbeat = decode_json(_heartbeat_decoder, payload, "heartbeat")
    workers = heartbeat.workers
    # C-level passes over the list (a Python loop would cost as much as the decoding): the names
    # against those already seen, and one sum per field, which is a float if any value is.
    if not (_known_names.issuperset(map(_group, workers))
            and _known_names.issuperset(map(_instance, workers))):
        for index, worker in enumerate(workers):
            _check_names(worker, index)
    if any(type(sum(map(field, workers))) is float for field in _whole_mib):
        for worker in workers:
            if type(worker.rss_mb) is float and not worker.rss_bytes:
                worker.rss_bytes = round(worker.rss_mb * MIB)
            worker.rss_mb = round(worker.rss_mb)
            worker.vram_mb = round(worker.vram_mb)
            worker.total_vram_mb = round(worker.total_vram_mb)
    return heartbeat


_group = attrgetter("group")
_instance = attrgetter("instance")
_whole_mib = (attrgetter("rss_mb"), attrgetter("vram_mb"), attrgetter("total_vram_mb"))
_id_pattern = re.compile(ID_PATTERN)
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 65536


def _check_names(worker: WorkerTelemetry, index: int) -> None:
    for field in ("group", "instance"):
        name = getattr(worker, field)
        if name not in _known_names and not _id_pattern.match(name):
            raise ContractError(
                f"invalid heartbeat: {name!r} is not a group or instance name: 1-{ID_MAX_CHARS} "
                f"characters of [A-Za-z0-9_.-], the first a letter or digit - at "
                f"`$.workers[{index}].{field}`")
    if len(_known_names) >= _KNOWN_NAMES_MAX:
        _known_names.clear()
    _known_names.update((worker.group, worker.instance))


# -- a hive's side of the bounds ----------------------------------------------------------------

_WORKER_FIGURES = ("cpu_pct", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "rate_window_s",
                   "memory_mb", "rss_mb", "vram_mb", "total_vram_mb", "uptime_s")
_WHOLE = ("rss_mb", "vram_mb", "total_vram_mb", "uptime_s")
_GPU_USE_FIGURES = ("vram_mb", "util_pct", "mem_util_pct", "util_window_s", "sample_age_s")
_DEVICE_FIGURES = ("util_pct", "mem_util_pct", "vram_total_mb", "vram_used_mb", "vram_free_mb",
                   "power_w", "sample_age_s")
_metric_key = re.compile(METRIC_KEY_PATTERN)


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


_MAX_FIGURE_F = float(MAX_FIGURE)  # a float compares faster with a float than with an int


def _in_range(value: float, low: float = 0.0) -> bool:
    return low <= value <= _MAX_FIGURE_F  # False for NaN too


def _fit_figures(record: msgspec.Struct, names: tuple[str, ...],
                 unknowable: tuple[str, ...] = ()) -> list[str]:
    """Out-of-range figures of ``record`` set to None (unknown) if in ``unknowable``, else 0."""
    problems = []
    for name in names:
        value = getattr(record, name)
        if value is not None and not _in_range(value):
            problems.append(f"{name} {value!r} out of range")
            setattr(record, name, None if name in unknowable else 0)
    return problems


def _fit_issues(issues: list[CollectorIssue]) -> list[CollectorIssue]:
    if len(issues) <= MAX_ERRORS and all(len(i.message) <= LONG_TEXT_CHARS
                                         and len(i.collector) <= SHORT_TEXT_CHARS for i in issues):
        return issues
    return [CollectorIssue(collector=cut(i.collector, SHORT_TEXT_CHARS),
                           message=cut(i.message, LONG_TEXT_CHARS)) for i in issues[:MAX_ERRORS]]


def _all_in_range(values: list, low: float = 0.0) -> bool:
    """Every value (numbers) within [low, MAX_FIGURE]: three C calls, whatever the count; a NaN
    makes the sum NaN and fails it."""
    return not values or (min(values) >= low and max(values) <= _MAX_FIGURE_F
                          and sum(values) == sum(values))


def fit_worker(worker: WorkerTelemetry) -> None:
    """Cut a freshly collected record to the contract's bounds, in place, so the queen accepts
    the heartbeat whatever a plugin, a command line or a driver put into it: long text is
    shortened, whole-number fields are rounded, a figure out of range becomes 0 (or unknown),
    metrics that cannot be sent are dropped. What was changed is said in ``errors`` (collector
    ``contract``). It runs for every worker every tick, so a record within bounds costs only a
    few checks."""
    problems: list[str] = []
    figures = [worker.cpu_pct, worker.io_r_mb_s, worker.io_w_mb_s, worker.rate_window_s,
               worker.memory_mb, worker.rss_mb, worker.vram_mb, worker.total_vram_mb,
               worker.uptime_s]  # _WORKER_FIGURES, spelled out: this runs every tick
    if worker.gpu_util_pct is not None:
        figures.append(worker.gpu_util_pct)
    if not _all_in_range(figures):
        problems += _fit_figures(worker, _WORKER_FIGURES, ("gpu_util_pct",))
    if not (type(worker.rss_mb) is type(worker.vram_mb) is type(worker.total_vram_mb)
            is type(worker.uptime_s) is int):
        for name in _WHOLE:
            setattr(worker, name, round(getattr(worker, name)))
    if worker.model is not None and len(worker.model) > SHORT_TEXT_CHARS:
        worker.model = cut(worker.model, SHORT_TEXT_CHARS)
    if worker.metrics and not (len(worker.metrics) <= MAX_METRICS
                               and worker.metrics.keys() <= _known_metric_keys
                               and _all_metric_values(list(worker.metrics.values()))):
        problems += _fit_metrics(worker)
    indices = worker.gpu_indices
    if indices and (len(indices) > MAX_GPUS or min(indices) < 0 or max(indices) >= MAX_GPUS):
        problems.append("GPU indices out of range dropped")
        worker.gpu_indices = [i for i in indices if 0 <= i < MAX_GPUS][:MAX_GPUS]
    if worker.gpus:
        worker.gpus = worker.gpus[:MAX_GPUS]
        for use in worker.gpus:
            use.uuid = cut(use.uuid, SHORT_TEXT_CHARS)
            problems += _fit_figures(use, _GPU_USE_FIGURES, ("vram_mb", "util_pct", "mem_util_pct"))
    if problems:
        worker.errors = [*worker.errors[:MAX_ERRORS - 1],
                         CollectorIssue(collector="contract", message="; ".join(problems))]
    if worker.errors:
        worker.errors = _fit_issues(worker.errors)


_known_metric_keys: set[str] = set()


def _all_metric_values(values: list) -> bool:
    return all(type(v) is float or type(v) is int for v in values) and _all_in_range(
        values, -_MAX_FIGURE_F)


def _fit_metrics(worker: WorkerTelemetry) -> list[str]:
    """Keep the metrics the contract can carry (and remember their keys, so the next tick's
    check of the same keys is a set comparison)."""
    metrics = {key: value for key, value in worker.metrics.items()
               if isinstance(key, str) and len(key) <= METRIC_KEY_CHARS
               and _metric_key.match(key) and type(value) in (int, float)
               and _in_range(value, -_MAX_FIGURE_F)}
    if len(metrics) > MAX_METRICS:
        metrics = dict(list(metrics.items())[:MAX_METRICS])
    if len(_known_metric_keys) >= _KNOWN_NAMES_MAX:
        _known_metric_keys.clear()
    _known_metric_keys.update(metrics)
    dropped = len(worker.metrics) - len(metrics)
    worker.metrics = metrics
    if not dropped:
        return []
    return [f"{dropped} metrics dropped (at most {MAX_METRICS}, keys of {METRIC_KEY_CHARS} "
            f"characters {METRIC_KEY_PATTERN}, finite values)"]


def fit_gpu(device: GpuDevice) -> None:
    """A driver's device record cut to the contract's bounds, in place (as ``fit_worker``)."""
    device.uuid = cut(device.uuid, SHORT_TEXT_CHARS)
    device.name = cut(device.name, SHORT_TEXT_CHARS)
    if device.mig_parent_uuid is not None:
        device.mig_parent_uuid = cut(device.mig_parent_uuid, SHORT_TEXT_CHARS)
    problems = _fit_figures(device, _DEVICE_FIGURES, ("util_pct", "mem_util_pct", "power_w"))
    if device.temperature_c is not None and not _in_range(device.temperature_c, -_MAX_FIGURE_F):
        problems.append(f"temperature_c {device.temperature_c!r} out of range")
        device.temperature_c = None
    if not isinstance(device.health, Healthy) and len(device.health.reason) > LONG_TEXT_CHARS:
        device.health = type(device.health)(reason=cut(device.health.reason, LONG_TEXT_CHARS))
    if len(device.faults) > MAX_ERRORS or any(len(f.detail) > LONG_TEXT_CHARS
                                              for f in device.faults):
        device.faults = [msgspec.structs.replace(f, detail=cut(f.detail, LONG_TEXT_CHARS))
                         for f in device.faults[:MAX_ERRORS]]
    errors = device.errors
    if problems:
        errors = [*errors[:MAX_ERRORS - 1], CollectorIssue(collector="contract",
                                                           message="; ".join(problems))]
    device.errors = _fit_issues(errors)
