"""GPU utilisation and VRAM per worker, and the hive's GPUs as its capabilities.

The source (NVML, else nvidia-smi, else none) is opened once per hive at setup. Each tick the hive
calls ``rbee_refresh_devices`` in a worker thread; the per-worker hook only reads that snapshot,
so collection never waits on the GPU. A worker's GPU use is that of every process in its cgroup,
children included. Without a GPU the devices list is empty and the GPU fields stay 0, silently.
"""

from __future__ import annotations

from rbee.hive.gpu import GpuSnapshot, GpuSource, open_gpu_source
from rbee.plugin import hookimpl


class GpuCollector:
    """Per-hive state of the GPU plugin: the open source and its latest snapshot."""

    def __init__(self, source: GpuSource | None) -> None:
        self.source = source
        self.snapshot = GpuSnapshot()

    @hookimpl
    def rbee_refresh_devices(self):
        if self.source is None:
            return []
        try:
            self.snapshot = self.source.snapshot()
        except BaseException:
            self.snapshot = GpuSnapshot()  # stale per-process numbers would mislead a scheduler
            raise
        return self.snapshot.devices

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry) -> None:
        snapshot = self.snapshot
        uses = []
        if snapshot.processes:
            for pid in worker.pids():
                uses.extend(snapshot.processes.get(pid, ()))
        indices = sorted({use.gpu_index for use in uses}) or list(worker.gpu_indices)
        if not indices:
            return
        devices = {device.index: device for device in snapshot.devices}
        telemetry.gpu_indices = indices
        telemetry.vram_mb = round(sum(use.vram_mb for use in uses), 1)
        telemetry.total_vram_mb = round(
            sum(devices[i].vram_total_mb for i in indices if i in devices), 1
        )
        per_process = [use.util_pct for use in uses if use.util_pct is not None]
        if per_process:
            telemetry.gpu_util_pct = min(100.0 * len(indices), sum(per_process))
        else:  # nvidia-smi reports no per-process utilisation: the device's is the best bound
            telemetry.gpu_util_pct = max((devices[i].util_pct for i in indices if i in devices),
                                         default=0.0)

    @hookimpl
    def rbee_collector_teardown(self) -> None:
        if self.source is not None:
            self.source.close()


@hookimpl
def rbee_collector_setup(settings, plugin_manager) -> None:
    source = open_gpu_source(settings.gpu, settings.nvidia_smi_path, settings.nvidia_smi_timeout_s)
    if source is not None:  # no GPU: nothing to refresh, nothing to add to any worker
        plugin_manager.register(GpuCollector(source), name="gpu.devices")
