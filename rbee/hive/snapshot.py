"""The hive's heartbeat as one snapshot: who the hive is, its workers, its GPUs, and its health,
cut to the contract's bounds (a plugin's or a driver's excess costs its own field, never the
delivery of the whole heartbeat)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from .. import __version__
from ..config import HiveConfig
from ..contract import (
    LONG_TEXT_CHARS,
    MAX_GPUS,
    SHORT_TEXT_CHARS,
    CollectorIssue,
    Degraded,
    HealthStatus,
    Healthy,
    HiveHeartbeat,
    HiveInfo,
    OperationalStatus,
    WorkerTelemetry,
    cut,
    describe_health,
    utc_now,
)
from .collection import TelemetryCollector
from .fitting import fit_gpu, fit_worker


def health(collector: TelemetryCollector, late: Iterable[CollectorIssue]) -> HealthStatus:
    """Degraded, with every reason, when a refresh or sample failed or ran late (``late``), a
    plugin overran its per-tick budget, or a GPU is not healthy (scheduling queries also skip
    workers on an unhealthy GPU)."""
    issues = [*collector.refresh_errors, *collector.sample_errors,
              *collector.worker_refresh_errors, *late]
    issues += [CollectorIssue(collector=name, message=f"over its per-tick budget ({ms} ms)")
               for name, ms in collector.over_budget.items()]
    reasons = [f"{i.collector}: {i.message}" for i in issues]
    reasons += [f"GPU {d.index} ({d.uuid}) {describe_health(d.health)}"
                for d in collector.devices if not isinstance(d.health, Healthy)]
    return Degraded(reason=cut("; ".join(reasons), LONG_TEXT_CHARS)) if reasons else Healthy()


def heartbeat(config: HiveConfig, port: int, status: OperationalStatus, state: HealthStatus,
              collector: TelemetryCollector, workers: list[WorkerTelemetry]) -> HiveHeartbeat:
    """The snapshot of ``workers`` and the collector's devices, each fitted to the contract."""
    for worker in workers:
        fit_worker(worker)
    devices = collector.devices_now()[:MAX_GPUS]
    for device in devices:
        fit_gpu(device)
    return HiveHeartbeat(
        hive=HiveInfo(id=config.id, hostname=cut(socket.gethostname(), SHORT_TEXT_CHARS),
                      port=port, operational_status=status, health_status=state,
                      version=__version__, plugins=collector.plugin_infos),
        timestamp=utc_now(), workers=workers, capabilities=devices)
