"""The fleet in Prometheus' terms: per worker, per GPU and per hive, read at scrape time.

Both the queen (the whole fleet) and a hive (itself, node_exporter style) serve ``GET /metrics``
through ``FleetCollector``, a prometheus-client custom collector: it builds its metric families
from the current records when scraped, so there is no metric object per heartbeat and a worker or
hive that is gone is gone from the next scrape (cardinality stays that of the fleet).

Names and units follow Prometheus' conventions: base units (bytes, seconds, ratios of one CPU
core or one GPU), ``_total`` only on counters. Labels: ``hive``, ``group``, ``instance``,
``model`` on workers; ``hive``, ``gpu`` (index), ``uuid`` (and ``mig_parent`` for a MIG instance)
on GPUs. A figure the hive does not know (``null`` in the contract) is left out, never sent as 0.
Plugin figures follow, a family per declared figure (``rbee.plugin_figures``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .contract import GpuDevice, HiveRecord, WorkerTelemetry, describe_health, on_gpu
from .plugin_figures import UNDECLARED_HELP, UNDECLARED_NAME, plugin_samples

MIB = 2**20
HEALTH_STATES = ("healthy", "degraded", "unhealthy")


WORKER_LABELS = ("hive", "group", "instance", "model")
GPU_LABELS = ("hive", "gpu", "uuid", "mig_parent")

# (name, help, value in base units or None when unknown)
WORKER_GAUGES: tuple[tuple[str, str, Callable[[WorkerTelemetry], float | None]], ...] = (
    ("rbee_worker_cpu_ratio", "CPU used, in cores (1.0 = one core busy), over the last sample",
     lambda w: w.cpu_pct / 100),
    ("rbee_worker_cpu_limit_ratio", "CPU limit, in cores",
     lambda w: None if w.cpu_limit_pct is None else w.cpu_limit_pct / 100),
    ("rbee_worker_resident_memory_bytes", "Resident memory of the worker's main process",
     lambda w: w.rss_mb * MIB),
    ("rbee_worker_memory_bytes", "Memory the worker's cgroup is charged, page cache included",
     lambda w: w.memory_mb * MIB),
    ("rbee_worker_memory_limit_bytes", "Memory limit of the worker's cgroup",
     lambda w: None if w.memory_limit_mb is None else w.memory_limit_mb * MIB),
    ("rbee_worker_io_read_bytes_per_second", "Bytes read per second over the last sample",
     lambda w: w.io_r_mb_s * MIB),
    ("rbee_worker_io_write_bytes_per_second", "Bytes written per second over the last sample",
     lambda w: w.io_w_mb_s * MIB),
    ("rbee_worker_uptime_seconds", "Seconds since the worker started", lambda w: w.uptime_s),
    ("rbee_worker_gpu_utilization_ratio",
     "GPU use summed over its GPUs (1.0 = one GPU busy); see gpu_util_source",
     lambda w: None if w.gpu_util_pct is None else w.gpu_util_pct / 100),
    ("rbee_worker_gpu_memory_bytes", "VRAM its processes hold, all its GPUs",
     lambda w: w.vram_mb * MIB if on_gpu(w) else None),
    ("rbee_worker_errors", "Collector errors in its last record", lambda w: len(w.errors)),
    ("rbee_worker_engine_requests_running", "Requests its inference engine is serving",
     lambda w: None if w.engine is None else w.engine.requests_running),
    ("rbee_worker_engine_requests_waiting", "Requests queued in its inference engine",
     lambda w: None if w.engine is None else w.engine.requests_waiting),
    ("rbee_worker_engine_kv_cache_usage_ratio", "Share of its engine's KV cache in use",
     lambda w: None if w.engine is None or w.engine.kv_cache_pct is None
     else w.engine.kv_cache_pct / 100),
    ("rbee_worker_engine_prompt_tokens_per_second", "Prompt tokens its engine processed per second",
     lambda w: None if w.engine is None else w.engine.prompt_tokens_s),
    ("rbee_worker_engine_generation_tokens_per_second", "Tokens its engine generated per second",
     lambda w: None if w.engine is None else w.engine.generation_tokens_s),
    ("rbee_worker_engine_time_to_first_token_p95_seconds",
     "95th percentile of its engine's time to first token over the engine window",
     lambda w: None if w.engine is None else w.engine.ttft_p95_s),
)

GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuDevice], float | None]], ...] = (
    ("rbee_gpu_utilization_ratio", "Share of the driver's sampling period a kernel ran",
     lambda d: None if d.util_pct is None else d.util_pct / 100),
    ("rbee_gpu_memory_utilization_ratio", "Share of the driver's period memory was busy",
     lambda d: None if d.mem_util_pct is None else d.mem_util_pct / 100),
    ("rbee_gpu_memory_total_bytes", "VRAM of the device", lambda d: d.vram_total_mb * MIB),
    ("rbee_gpu_memory_used_bytes", "VRAM in use on the device", lambda d: d.vram_used_mb * MIB),
    ("rbee_gpu_memory_free_bytes", "VRAM free on the device", lambda d: d.vram_free_mb * MIB),
    ("rbee_gpu_temperature_celsius", "GPU temperature", lambda d: d.temperature_c),
    ("rbee_gpu_power_watts", "Power draw", lambda d: d.power_w),
    ("rbee_gpu_sample_age_seconds", "Age of these figures when the heartbeat was built",
     lambda d: d.sample_age_s),
)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    help: str
    labels: tuple[str, ...]
    info: bool = False
    """An info metric: its value is 1, its labels are the information."""
    counter: bool = False
    """A counter: its samples are named ``<name>_total``."""
    unit: str = ""
    """OpenMetrics' ``# UNIT`` (the name ends with it)."""


WORKER_FAMILIES = tuple(Family(name, text, WORKER_LABELS) for name, text, _ in WORKER_GAUGES)
GPU_FAMILIES = tuple(Family(name, text, GPU_LABELS) for name, text, _ in GPU_GAUGES)
OTHER_FAMILIES = (
    Family("rbee_worker_gpu_device_utilization_ratio",
           "A worker's SM use of one GPU or MIG instance (its own processes' samples, or the "
           "device's figure where per-process figures are unsupported: see source)",
           (*WORKER_LABELS, "gpu", "uuid", "source")),
    Family("rbee_worker_gpu_device_memory_bytes", "VRAM a worker's processes hold on one GPU",
           (*WORKER_LABELS, "gpu", "uuid")),
    Family("rbee_gpu_health", "1 for the GPU's health state", (*GPU_LABELS, "state")),
    Family("rbee_gpu_faults", "Standing faults by kind", (*GPU_LABELS, "kind", "fatal")),
    Family("rbee_hive_up", "1 when the hive is heard from (not stale)", ("hive",)),
    Family("rbee_hive_heartbeat_age_seconds",
           "Seconds since its last heartbeat, by the queen's clock", ("hive",)),
    Family("rbee_hive_health", "1 for the hive's health state", ("hive", "state")),
    Family("rbee_hive_workers", "Workers the hive reports", ("hive",)),
    Family("rbee_hive", "The hive's version, host and status",
           ("hive", "version", "hostname", "status"), info=True),
)
LIFECYCLE_FAMILIES = (
    Family("rbee_worker_restarts", "Times the hive started the worker again after its process "
           "ended", WORKER_LABELS, counter=True),
    Family("rbee_worker_oom_kills", "Processes of the worker the OOM killer ended, over all its "
           "restarts (its cgroup's oom_kill)", WORKER_LABELS, counter=True),
    Family("rbee_worker_state", "1, labelled with the worker's state (running, starting, backoff, "
           "crashloop, exited, oom_killed); only running takes work", (*WORKER_LABELS, "state")),
)
"""Per worker, after the rest (``rbee.hive.supervisor`` says what the states mean)."""
UNDECLARED = Family(UNDECLARED_NAME, UNDECLARED_HELP, (*WORKER_LABELS, "key"))
FAMILIES = (WORKER_FAMILIES + OTHER_FAMILIES[:2] + GPU_FAMILIES + OTHER_FAMILIES[2:]
            + LIFECYCLE_FAMILIES)

WORKER_PREFIXES = ("rbee_worker_", "rbee_gpu_", "rbee_plugin_")
"""The samples that need each worker's or GPU's labels; the hives' are ``rbee_hive*``, the
queen's own ``rbee_queen_*``."""
FLEET_PREFIXES = (*WORKER_PREFIXES, "rbee_hive")


Row = tuple[tuple[str, ...], tuple[str, ...], float]
"""One sample: the entity's labels (one tuple per worker, GPU or hive, shared by all of its
samples), the family's extra labels, the value."""


def fleet_rows(hives: list[HiveRecord]) -> list[list[Row]]:
    """Every sample of the fleet, per family (in ``FAMILIES`` order), in one pass."""
    rows: list[list[Row]] = [[] for _ in FAMILIES]
    gpus_at = len(WORKER_FAMILIES) + 2
    worker_rows, gpu_rows = rows[:len(WORKER_FAMILIES)], rows[gpus_at:gpus_at + len(GPU_FAMILIES)]
    (device_util, device_vram, gpu_health, gpu_faults, hive_up, hive_age, hive_health,
     hive_workers, hive_info) = (rows[FAMILIES.index(f)] for f in OTHER_FAMILIES)
    restarts, oom_kills, worker_state = rows[-len(LIFECYCLE_FAMILIES):]
    none = ()
    for hive in hives:
        hive_id = hive.info.id
        hive_labels = (hive_id,)
        hive_up.append((hive_labels, none, 0.0 if hive.stale else 1.0))
        hive_age.append((hive_labels, none, hive.silent_s))
        hive_workers.append((hive_labels, none, len(hive.workers)))
        state = _state(hive.info.health_status)
        for known in HEALTH_STATES:
            hive_health.append((hive_labels, (known,), 1.0 if known == state else 0.0))
        hive_info.append((hive_labels, (hive.info.version, hive.info.hostname,
                                        str(hive.info.operational_status)), 1.0))
        for worker in hive.workers:
            labels = (hive_id, worker.group, worker.instance, worker.model or "")
            for family_rows, (_, _, value_of) in zip(worker_rows, WORKER_GAUGES, strict=True):
                value = value_of(worker)
                if value is not None:
                    family_rows.append((labels, none, value))
            restarts.append((labels, none, worker.restarts))
            oom_kills.append((labels, none, worker.oom_kills))
            worker_state.append((labels, (str(worker.state),), 1.0))
            for use in worker.gpus:
                if use.util_pct is not None:
                    device_util.append((labels, (str(use.index), use.uuid,
                                                 str(use.util_source or "")), use.util_pct / 100))
                if use.vram_mb is not None:
                    device_vram.append((labels, (str(use.index), use.uuid), use.vram_mb * MIB))
        for device in hive.gpus:
            labels = (hive_id, str(device.index), device.uuid, device.mig_parent_uuid or "")
            for family_rows, (_, _, value_of) in zip(gpu_rows, GPU_GAUGES, strict=True):
                value = value_of(device)
                if value is not None:
                    family_rows.append((labels, none, value))
            state = _state(device.health)
            for known in HEALTH_STATES:
                gpu_health.append((labels, (known,), 1.0 if known == state else 0.0))
            for (kind, fatal), count in sorted(_fault_counts(device).items()):
                gpu_faults.append((labels, (kind, fatal), count))
    return rows


class FleetCollector(Collector):
    """The fleet as a prometheus-client collector over ``records()``, for any
    ``CollectorRegistry`` (one's own exporter, say). rbee's own ``/metrics`` writes the same
    samples with ``fleet_text``: prometheus-client's generic encoder takes 2.8 s for a fleet of
    1,000 hives of 10 workers (230,000 samples), past a scrape's budget."""

    def __init__(self, records: Callable[[], Iterable[HiveRecord]]) -> None:
        self.records = records

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the fleet at scrape time

    def collect(self) -> Iterator[Metric]:
        hives = list(self.records())
        yield from self._fleet(hives)
        declared, undeclared = plugin_samples(hives, lambda hive, w: (
            hive.info.id, w.group, w.instance, w.model or ""))
        for family, samples in declared:
            kind = CounterMetricFamily if family.counter else GaugeMetricFamily
            metric = kind(family.name, family.help, labels=WORKER_LABELS, unit=family.unit)
            for labels, value in samples:
                metric.add_metric(labels, value)
            yield metric
        if undeclared:
            metric = GaugeMetricFamily(UNDECLARED.name, UNDECLARED.help, labels=UNDECLARED.labels)
            for labels, key, value in undeclared:
                metric.add_metric((*labels, key), value)
            yield metric

    def _fleet(self, hives: list[HiveRecord]) -> Iterator[Metric]:
        for family, rows in zip(FAMILIES, fleet_rows(hives), strict=True):
            if family.info:
                metric = InfoMetricFamily(family.name, family.help, labels=family.labels[:1])
                for labels, extra, _ in rows:
                    metric.add_metric(labels, dict(zip(family.labels[1:], extra, strict=True)))
            elif family.counter:
                metric = CounterMetricFamily(family.name, family.help, labels=family.labels)
                for labels, extra, value in rows:
                    metric.add_metric(labels + extra, value)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=family.labels)
                for labels, extra, value in rows:
                    metric.add_metric(labels + extra, value)
            yield metric


PART = 256
"""Entities (workers, GPUs, hives) per part of a family: ~0.2-1 ms of writing, after which a
scrape written on the event loop lets heartbeats go first (``fleet_parts``)."""


def fleet_text(hives: list[HiveRecord], openmetrics: bool, detail: bool = True,
               names: Collection[str] | None = None) -> str:
    """``fleet_parts`` in one string."""
    return "".join(fleet_parts(hives, openmetrics, detail, names))


def fleet_parts(hives: list[HiveRecord], openmetrics: bool, detail: bool = True,
                names: Collection[str] | None = None) -> Iterator[str]:
    """The same samples as ``fleet_rows``, in the text format (0.0.4) or OpenMetrics 1.0, written
    directly: each worker's, GPU's and hive's label string is built once and every family is a
    list comprehension over them (~0.7 µs a sample here, against ~12 µs through
    prometheus-client's encoder). ``test_exposition`` holds the two to the same samples.

    In parts of at most ``PART`` entities, some empty: a caller on the event loop yields to it
    after each, so a scrape of 20,000 workers (73 MB, over a second of the core) delays no
    heartbeat by more than a part; in a worker thread it held the GIL from them instead, and
    heartbeat p99 went from 2 ms to 370 ms while it ran (docs/scale.md).

    ``detail`` False: the hives' families only, no worker's, GPU's or plugin's sample.
    ``names`` (a scrape's ``name[]``): only the families with a sample of these names; a family
    left out costs nothing, its samples are never formatted."""
    wanted = _wanted(names)
    if names is not None and not any(name.startswith(WORKER_PREFIXES) for name in names):
        detail = False  # no worker's or GPU's label is built for the hives' families alone
    workers: list[tuple[str, WorkerTelemetry]] = []
    gpus: list[tuple[str, GpuDevice]] = []
    hive_labels: list[tuple[str, HiveRecord]] = []
    for start in range(0, len(hives), PART // 8):
        for hive in hives[start:start + PART // 8]:
            hive_id = _escape(hive.info.id)
            hive_labels.append((f'hive="{hive_id}"', hive))
            if not detail:
                continue
            for w in hive.workers:
                workers.append((_worker_labels(hive_id, w), w))
            for d in hive.gpus:
                gpus.append((f'hive="{hive_id}",gpu="{d.index}",uuid="{_escape(d.uuid)}",'
                             f'mig_parent="{_escape(d.mig_parent_uuid or "")}"', d))
        yield ""

    def family(family: Family, entities: list, lines_of: Callable[[list], list[str]]
               ) -> Iterator[str]:
        """The family's lines, ``lines_of`` each part of ``entities`` (never called for a
        family not wanted); its header before the first line, none if it has no line."""
        if not wanted(family):
            return
        header = False
        for start in range(0, len(entities), PART):
            lines = lines_of(entities[start:start + PART])
            if lines and not header:
                header = True
                name = _sample_name(family, openmetrics)
                kind = ("counter" if family.counter else "info" if family.info and openmetrics
                        else "gauge")
                yield f"# HELP {name} {family.help}\n# TYPE {name} {kind}\n"
                if family.unit and openmetrics:
                    yield f"# UNIT {name} {family.unit}\n"
            yield "".join(lines)

    for spec, (name, _, value_of) in zip(WORKER_FAMILIES, WORKER_GAUGES, strict=True):
        yield from family(spec, workers, lambda part, name=name, value_of=value_of: [
            f"{name}{{{labels}}} {value!r}\n" for labels, w in part
            if (value := value_of(w)) is not None])
    util, vram = OTHER_FAMILIES[0].name, OTHER_FAMILIES[1].name
    yield from family(OTHER_FAMILIES[0], workers, lambda part: [
        f'{util}{{{labels},gpu="{u.index}",uuid="{_escape(u.uuid)}",source="{u.util_source or ""}"}}'
        f" {u.util_pct / 100!r}\n" for labels, w in part for u in w.gpus if u.util_pct is not None])
    yield from family(OTHER_FAMILIES[1], workers, lambda part: [
        f'{vram}{{{labels},gpu="{u.index}",uuid="{_escape(u.uuid)}"}} {u.vram_mb * MIB!r}\n'
        for labels, w in part for u in w.gpus if u.vram_mb is not None])
    for spec, (name, _, value_of) in zip(GPU_FAMILIES, GPU_GAUGES, strict=True):
        yield from family(spec, gpus, lambda part, name=name, value_of=value_of: [
            f"{name}{{{labels}}} {value!r}\n" for labels, d in part
            if (value := value_of(d)) is not None])
    health, faults = OTHER_FAMILIES[2].name, OTHER_FAMILIES[3].name
    yield from family(OTHER_FAMILIES[2], gpus, lambda part: [
        f'{health}{{{labels},state="{known}"}} {1.0 if _state(d.health) == known else 0.0}\n'
        for labels, d in part for known in HEALTH_STATES])
    yield from family(OTHER_FAMILIES[3], gpus, lambda part: [
        f'{faults}{{{labels},kind="{kind}",fatal="{fatal}"}} {count}\n' for labels, d in part
        for (kind, fatal), count in sorted(_fault_counts(d).items())])
    up, age, hive_health, count, info = (f.name for f in OTHER_FAMILIES[4:])
    yield from family(OTHER_FAMILIES[4], hive_labels, lambda part: [
        f"{up}{{{labels}}} {0.0 if h.stale else 1.0}\n" for labels, h in part])
    yield from family(OTHER_FAMILIES[5], hive_labels, lambda part: [
        f"{age}{{{labels}}} {h.silent_s!r}\n" for labels, h in part])
    yield from family(OTHER_FAMILIES[6], hive_labels, lambda part: [
        f'{hive_health}{{{labels},state="{known}"}} '
        f"{1.0 if _state(h.info.health_status) == known else 0.0}\n"
        for labels, h in part for known in HEALTH_STATES])
    yield from family(OTHER_FAMILIES[7], hive_labels, lambda part: [
        f"{count}{{{labels}}} {len(h.workers)}\n" for labels, h in part])
    yield from family(OTHER_FAMILIES[8], hive_labels, lambda part: [
        f'{info}_info{{{labels},version="{_escape(h.info.version)}",hostname='
        f'"{_escape(h.info.hostname)}",status="{h.info.operational_status}"}} 1.0\n'
        for labels, h in part])
    restarts, oom_kills, state = (f.name for f in LIFECYCLE_FAMILIES)
    yield from family(LIFECYCLE_FAMILIES[0], workers, lambda part: [
        f"{restarts}_total{{{labels}}} {w.restarts}\n" for labels, w in part])
    yield from family(LIFECYCLE_FAMILIES[1], workers, lambda part: [
        f"{oom_kills}_total{{{labels}}} {w.oom_kills}\n" for labels, w in part])
    yield from family(LIFECYCLE_FAMILIES[2], workers, lambda part: [
        f'{state}{{{labels},state="{w.state}"}} 1.0\n' for labels, w in part])
    if not detail:
        return
    labels_of = {id(w): labels for labels, w in workers}  # each worker's, built once above
    declared, undeclared = plugin_samples(hives, lambda hive, w: labels_of[id(w)])
    for plugin, samples in declared:
        sample = f"{plugin.name}_total" if plugin.counter else plugin.name
        yield from family(
            Family(plugin.name, _escape_help(plugin.help, openmetrics), WORKER_LABELS,
                   counter=plugin.counter, unit=plugin.unit),
            samples, lambda part, sample=sample: [
                f"{sample}{{{labels}}} {value!r}\n" for labels, value in part])
    yield from family(UNDECLARED, undeclared, lambda part: [
        f'{UNDECLARED.name}{{{labels},key="{_escape(key)}"}} {value!r}\n'
        for labels, key, value in part])


def _sample_name(family: Family, openmetrics: bool) -> str:
    """The family's name as the format writes it (text 0.0.4 suffixes counters and infos)."""
    if family.counter and not openmetrics:
        return f"{family.name}_total"
    return family.name if openmetrics or not family.info else f"{family.name}_info"


def _wanted(names: Collection[str] | None) -> Callable[[Family], bool]:
    """Whether a scrape's ``name[]`` selects a family: by its name or a sample name of it
    (``_total``, ``_info``), as ``rbee.scrape`` selects the server's own figures."""
    if names is None:
        return lambda family: True
    return lambda family: not names.isdisjoint(
        (family.name, f"{family.name}_total", f"{family.name}_info"))


def _worker_labels(hive_id: str, w: WorkerTelemetry) -> str:
    """A worker's label string; ``hive_id`` already escaped."""
    return (f'hive="{hive_id}",group="{_escape(w.group)}",instance="{_escape(w.instance)}",'
            f'model="{_escape(w.model or "")}"')


def _escape_help(text: str, openmetrics: bool) -> str:
    """A plugin's help text (whitespace already collapsed to single spaces) as HELP needs it."""
    text = text.replace("\\", "\\\\")
    return text.replace('"', '\\"') if openmetrics else text


def _state(status) -> str:
    return describe_health(status).partition(":")[0]


def _fault_counts(device: GpuDevice) -> Counter:
    return Counter((str(f.kind), str(f.fatal).lower()) for f in device.faults)


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value
