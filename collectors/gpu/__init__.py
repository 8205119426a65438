"""GPU use and VRAM per worker, per GPU, and the hive's GPUs (with their health) as capabilities.

The source (NVML, else nvidia-smi, else none) is opened once per hive at setup. Each tick the hive
calls ``rbee_refresh_devices`` (devices, health, process lists: µs per GPU) and, on a thread of its
own, ``rbee_sample_devices`` (per-process utilisation: ms per GPU); the per-worker hook only joins
what they cached, so collection never waits on the GPU.

A worker's GPU use is that of every process in its cgroup, children included, per GPU: VRAM from
the driver's compute and graphics process lists, utilisation from per-process samples (0 % for a
process that did not run since the last sample) or, where the driver has no per-process figures,
the device's, marked ``gpu_util_source: device``. What the driver does not say is None with the
reason in ``errors``, never 0. Without a GPU the devices list is empty and nothing is added.
"""

from __future__ import annotations

import time

from rbee.contract import CollectorIssue, GpuUtilSource, WorkerGpuUse
from rbee.plugin import hookimpl

from .pick import open_gpu_source
from .source import GpuSnapshot, GpuSource


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
    def rbee_sample_devices(self) -> None:
        if self.source is not None:
            self.source.sample()

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry) -> None:
        snapshot = self.snapshot
        if self.source is None or not snapshot.devices:
            return
        pids_on: dict[str, list[int]] = {}
        index_of: dict[str, int] = {}
        vram_on: dict[str, float | None] = {}
        if snapshot.processes:
            for pid in worker.pids():
                for placed in snapshot.processes.get(pid, ()):
                    pids_on.setdefault(placed.uuid, []).append(pid)
                    index_of[placed.uuid] = placed.gpu_index
                    known = vram_on.get(placed.uuid, 0.0)
                    vram_on[placed.uuid] = (None if known is None or placed.vram_mb is None
                                            else known + placed.vram_mb)
        for device in snapshot.devices:  # CUDA_VISIBLE_DEVICES, before it allocates anything
            if (device.index in worker.gpu_indices and device.mig_parent_uuid is None
                    and device.uuid not in pids_on):
                pids_on[device.uuid], index_of[device.uuid] = [], device.index
                vram_on[device.uuid] = 0.0
        if not pids_on:
            return
        now = time.monotonic()
        uses = [self._use(uuid, index_of[uuid], pids, vram_on[uuid], snapshot, now, telemetry)
                for uuid, pids in pids_on.items()]
        uses.sort(key=lambda use: (use.index, use.uuid))
        totals = {device.uuid: device.vram_total_mb for device in snapshot.devices}
        telemetry.gpus = uses
        telemetry.gpu_indices = sorted({use.index for use in uses})
        # whole MiB, as the original's u64 (each GPU's own figure is in ``gpus``)
        telemetry.vram_mb = round(sum(use.vram_mb or 0.0 for use in uses))
        telemetry.total_vram_mb = round(sum(totals.get(use.uuid, 0.0) for use in uses))
        utils = [use.util_pct for use in uses]
        telemetry.gpu_util_pct = (None if None in utils
                                  else min(100.0 * len(uses), round(sum(utils), 1)))
        sources = {use.util_source for use in uses}
        telemetry.gpu_util_source = (GpuUtilSource.DEVICE if GpuUtilSource.DEVICE in sources
                                     else GpuUtilSource.PROCESS if GpuUtilSource.PROCESS in sources
                                     else None)

    def _use(self, uuid: str, index: int, pids: list[int], vram_mb: float | None,
             snapshot: GpuSnapshot, now: float, telemetry) -> WorkerGpuUse:
        if vram_mb is None:
            telemetry.errors.append(CollectorIssue(
                collector="gpu",
                message=f"GPU {index} ({uuid}): the driver reports no VRAM per process"))
        if not pids:  # none of its processes is on this GPU: it uses none of it
            return WorkerGpuUse(index=index, uuid=uuid, vram_mb=vram_mb, util_pct=0.0,
                                mem_util_pct=0.0)
        util = self.source.utilisation(uuid, snapshot)
        if util is None or util.source is None:
            problem = util.problem if util is not None else "no figure"
            telemetry.errors.append(CollectorIssue(
                collector="gpu", message=f"GPU {index} ({uuid}): utilisation unknown: {problem}"))
            return WorkerGpuUse(index=index, uuid=uuid, vram_mb=vram_mb, util_pct=None)
        if util.source is GpuUtilSource.PROCESS:
            figures = [util.of(pid) for pid in pids]
            sm = min(100.0, round(sum(f[0] for f in figures), 1))
            memory_bw = min(100.0, round(sum(f[1] for f in figures), 1))
        else:  # the device's figure covers all of its processes at once: never summed
            sm, memory_bw = util.device
        return WorkerGpuUse(index=index, uuid=uuid, vram_mb=vram_mb, util_pct=sm,
                            mem_util_pct=memory_bw, util_source=util.source,
                            util_window_s=round(util.window_s, 3),
                            sample_age_s=round(max(0.0, now - util.at), 3))

    @hookimpl
    def rbee_collector_teardown(self) -> None:
        if self.source is not None:
            self.source.close()


class GpuPlugin:
    """The plugin's set-up with its NVML seam. The entry point uses the real ``pynvml``; a test
    registers ``GpuPlugin(nvml=stub)`` (with the entry point disabled) to give a hive a stub NVML,
    or one that has no driver, on any host."""

    def __init__(self, nvml: object | None = None) -> None:
        self.nvml = nvml

    @hookimpl
    def rbee_collector_setup(self, settings, plugin_manager) -> None:
        source = open_gpu_source(settings.gpu, settings.nvidia_smi_path,
                                 settings.nvidia_smi_timeout_s, self.nvml,
                                 event_wait_s=settings.gpu_event_wait_s,
                                 xid_window_s=settings.gpu_xid_window_s)
        if source is not None:  # no GPU: nothing to refresh, nothing to add to any worker
            plugin_manager.register(GpuCollector(source), name="gpu.devices")


@hookimpl
def rbee_collector_setup(settings, plugin_manager) -> None:
    GpuPlugin().rbee_collector_setup(settings, plugin_manager)
