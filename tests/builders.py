"""Builders of contract messages for queen tests: a worker, a GPU, a heartbeat.

They build real ``rbee.contract`` structs (the same ones a hive sends), filled with plausible
values that a test overrides where it matters.
"""

from __future__ import annotations

from collections.abc import Sequence

from rbee.contract import (
    GpuDevice,
    HealthStatus,
    Healthy,
    HiveHeartbeat,
    HiveInfo,
    OperationalStatus,
    WorkerTelemetry,
    utc_now,
)

GIB = 1024.0  # MiB


def worker(instance: str = "w0", *, group: str = "llm", model: str | None = "llama-3-8b",
           gpu_util_pct: float = 0.0, vram_mb: float = 0, gpu_indices: Sequence[int] = (),
           total_vram_mb: float = 0, pid: int = 4242, **fields) -> WorkerTelemetry:
    values = dict(cpu_pct=12.5, rss_mb=512, io_r_mb_s=0.5, io_w_mb_s=0.25, uptime_s=60)
    values.update(fields)
    return WorkerTelemetry(
        pid=pid, group=group, instance=instance, gpu_util_pct=gpu_util_pct, vram_mb=vram_mb,
        total_vram_mb=total_vram_mb, model=model, gpu_indices=list(gpu_indices), **values)


def gpu(index: int, *, total_gib: float, used_gib: float, util_pct: float = 0.0) -> GpuDevice:
    return GpuDevice(index=index, uuid=f"GPU-{index:08d}", name="test gpu", util_pct=util_pct,
                     vram_total_mb=total_gib * GIB, vram_used_mb=used_gib * GIB,
                     vram_free_mb=(total_gib - used_gib) * GIB)


def heartbeat(hive_id: str = "hive-a", workers: Sequence[WorkerTelemetry] = (),
              gpus: Sequence[GpuDevice] = (), *,
              status: OperationalStatus = OperationalStatus.READY,
              health: HealthStatus | None = None) -> HiveHeartbeat:
    return HiveHeartbeat(
        hive=HiveInfo(id=hive_id, hostname=f"{hive_id}.test", port=7835,
                      operational_status=status, health_status=health or Healthy(),
                      version="test"),
        timestamp=utc_now(), workers=list(workers), capabilities=list(gpus))


def fleet_heartbeat(hive_id: str, n_workers: int) -> HiveHeartbeat:
    """A realistic heartbeat of ``n_workers`` workers on an 8-GPU hive (for size and load)."""
    gpus = [gpu(i, total_gib=80, used_gib=20 + i, util_pct=40.0 + i) for i in range(8)]
    workers = [worker(f"worker-{i:03d}", model=f"model-{i % 5}", gpu_util_pct=float(i % 100),
                      vram_mb=2048 + i, gpu_indices=[i % 8], total_vram_mb=80 * 1024,
                      pid=10_000 + i, rate_window_s=1.0, memory_mb=900.0 + i,
                      cpu_limit_pct=400.0, memory_limit_mb=32768.0)
               for i in range(n_workers)]
    return heartbeat(hive_id, workers, gpus)
