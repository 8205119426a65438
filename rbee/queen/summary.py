"""The fleet's totals for the stream's ``queen`` event (``FleetSummary``).

The dashboard's header shows them; at 10,000 workers adding them up in the browser on every
event is what made it stutter, and the queen has the fleet at hand every ``queen_interval_s``
anyway, so it adds them up once for every client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ..contract import FleetSummary, FleetWorker, GpuDevice, Healthy


def fleet_summary(online: list[FleetWorker], workers_total: int,
                  gpus: Iterable[GpuDevice]) -> FleetSummary:
    """Totals over the ``online`` workers (not stale), with ``workers_total`` counting every
    worker held and ``gpus`` the online hives' GPUs."""
    models: Counter[str] = Counter()
    states: Counter[str] = Counter()
    busy = running = waiting = rss = vram = 0
    cpu = 0.0
    for fleet_worker in online:
        worker = fleet_worker.worker
        if worker.model is not None:
            models[worker.model] += 1
        states[worker.state.value] += 1
        cpu += worker.cpu_pct
        rss += worker.rss_mb
        vram += worker.vram_mb
        engine = worker.engine
        if engine is not None:
            running += engine.requests_running
            waiting += engine.requests_waiting
            busy += engine.requests_running > 0
    gpu_count = unhealthy = 0
    for gpu in gpus:
        gpu_count += 1
        unhealthy += not isinstance(gpu.health, Healthy)
    return FleetSummary(workers_total=workers_total, workers_busy=busy,
                        requests_running=running, requests_waiting=waiting,
                        cpu_pct=round(cpu, 1), rss_mb=rss, vram_mb=vram, gpus=gpu_count,
                        gpus_unhealthy=unhealthy, models=dict(models), states=dict(states))
