"""The fleet in Prometheus' terms: per worker, per GPU and per hive, read at scrape time.

Both the queen (the whole fleet) and a hive (itself, node_exporter style) serve ``GET /metrics``
through ``FleetCollector``, a prometheus-client custom collector: it builds its metric families
from the current records when scraped, so there is no metric object per heartbeat and a worker or
hive that is gone is gone from the next scrape (cardinality stays that of the fleet).

Names and units follow Prometheus' conventions: base units (bytes, seconds, ratios of one CPU
core or one GPU), ``_total`` only on counters. Labels: ``hive``, ``group``, ``instance``,
``model`` on workers; ``hive``, ``gpu`` (index), ``uuid`` (and ``mig_parent`` for a MIG instance)
on GPUs. A figure the hive does not know (``null`` in the contract) is left out, never sent as 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import trio
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .telemetry import GpuDevice, HiveInfo, WorkerTelemetry, describe_health

MIB = 2**20
HEALTH_STATES = ("healthy", "degraded", "unhealthy")


@dataclass(frozen=True, slots=True)
class HiveRecord:
    """One hive as a scrape sees it (the structs are never mutated once stored)."""

    info: HiveInfo
    workers: list[WorkerTelemetry]
    gpus: list[GpuDevice]
    stale: bool = False
    silent_s: float = 0.0


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
     lambda w: w.vram_mb * MIB),
    ("rbee_worker_errors", "Collector errors in its last record", lambda w: len(w.errors)),
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


class FleetCollector(Collector):
    """A prometheus-client collector over ``records()``, called once per scrape."""

    def __init__(self, records: Callable[[], Iterable[HiveRecord]]) -> None:
        self.records = records

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the fleet at scrape time

    def collect(self) -> Iterator[Metric]:
        return fleet_families(list(self.records()))


def fleet_families(hives: list[HiveRecord]) -> Iterator[Metric]:
    worker_gauges = [GaugeMetricFamily(name, text, labels=WORKER_LABELS)
                     for name, text, _ in WORKER_GAUGES]
    per_gpu_util = GaugeMetricFamily(
        "rbee_worker_gpu_device_utilization_ratio",
        "A worker's SM use of one GPU or MIG instance (its own processes' samples, or the "
        "device's figure where per-process figures are unsupported: see source)",
        labels=(*WORKER_LABELS, "gpu", "uuid", "source"))
    per_gpu_vram = GaugeMetricFamily(
        "rbee_worker_gpu_device_memory_bytes", "VRAM a worker's processes hold on one GPU",
        labels=(*WORKER_LABELS, "gpu", "uuid"))
    gpu_gauges = [GaugeMetricFamily(name, text, labels=GPU_LABELS) for name, text, _ in GPU_GAUGES]
    gpu_health = GaugeMetricFamily("rbee_gpu_health", "1 for the GPU's health state",
                                   labels=(*GPU_LABELS, "state"))
    gpu_faults = GaugeMetricFamily("rbee_gpu_faults", "Standing faults by kind",
                                   labels=(*GPU_LABELS, "kind", "fatal"))
    hive_up = GaugeMetricFamily("rbee_hive_up", "1 when the hive is heard from (not stale)",
                                labels=("hive",))
    hive_age = GaugeMetricFamily("rbee_hive_heartbeat_age_seconds",
                                 "Seconds since its last heartbeat, by the queen's clock",
                                 labels=("hive",))
    hive_health = GaugeMetricFamily("rbee_hive_health", "1 for the hive's health state",
                                    labels=("hive", "state"))
    hive_workers = GaugeMetricFamily("rbee_hive_workers", "Workers the hive reports",
                                     labels=("hive",))
    hive_info = InfoMetricFamily("rbee_hive", "The hive's version, host and status",
                                 labels=("hive",))
    for hive in hives:
        hive_id = hive.info.id
        hive_up.add_metric([hive_id], 0.0 if hive.stale else 1.0)
        hive_age.add_metric([hive_id], hive.silent_s)
        hive_workers.add_metric([hive_id], len(hive.workers))
        state = describe_health(hive.info.health_status).partition(":")[0]
        for known in HEALTH_STATES:
            hive_health.add_metric([hive_id, known], 1.0 if known == state else 0.0)
        hive_info.add_metric([hive_id], {"version": hive.info.version,
                                         "hostname": hive.info.hostname,
                                         "status": str(hive.info.operational_status)})
        for worker in hive.workers:
            labels = [hive_id, worker.group, worker.instance, worker.model or ""]
            for family, (_, _, value_of) in zip(worker_gauges, WORKER_GAUGES, strict=True):
                value = value_of(worker)
                if value is not None:
                    family.add_metric(labels, value)
            for use in worker.gpus:
                if use.util_pct is not None:
                    per_gpu_util.add_metric([*labels, str(use.index), use.uuid,
                                             str(use.util_source or "")], use.util_pct / 100)
                if use.vram_mb is not None:
                    per_gpu_vram.add_metric([*labels, str(use.index), use.uuid],
                                            use.vram_mb * MIB)
        for device in hive.gpus:
            labels = [hive_id, str(device.index), device.uuid, device.mig_parent_uuid or ""]
            for family, (_, _, value_of) in zip(gpu_gauges, GPU_GAUGES, strict=True):
                value = value_of(device)
                if value is not None:
                    family.add_metric(labels, value)
            state = describe_health(device.health).partition(":")[0]
            for known in HEALTH_STATES:
                gpu_health.add_metric([*labels, known], 1.0 if known == state else 0.0)
            faults = Counter((str(f.kind), str(f.fatal).lower()) for f in device.faults)
            for (kind, fatal), count in sorted(faults.items()):
                gpu_faults.add_metric([*labels, kind, fatal], count)
    yield from worker_gauges
    yield from (per_gpu_util, per_gpu_vram)
    yield from gpu_gauges
    yield from (gpu_health, gpu_faults, hive_up, hive_age, hive_health, hive_workers, hive_info)


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition of ``registry`` in the format ``accept`` asks for: OpenMetrics when the
    scraper asks for it (Prometheus does), else the classic text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def metrics_route(registry: CollectorRegistry) -> Route:
    """``GET /metrics`` for ``registry``. The exposition is built in a worker thread: a large
    fleet's takes tens of milliseconds, which must not hold up heartbeats or the stream."""

    async def metrics(request: Request) -> Response:
        body, content_type = await trio.to_thread.run_sync(
            render, registry, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return Route("/metrics", metrics, methods=["GET"])
