"""NVML (``pynvml`` of the nvidia-ml-py distribution), initialised once per hive.

``snapshot`` is the refresh's critical path: per GPU, memory, utilisation, temperature, power,
the process lists and the health checks — a handful of NVML calls of a few µs each. The per-process
utilisation query (1.4-2.6 ms a call on an H100, whatever it is asked) and the Xid events are
``sample``'s, which the hive runs once per tick on a thread of its own.

MIG: a GPU in MIG mode is reported as its MIG instances, each a device of its own (``MIG-…``
UUID, its own memory, ``mig_parent_uuid``), and processes are attributed to the instance they run
on. The driver gives no utilisation for MIG instances (neither device nor per-process): those
figures are None with the reason. A lent or production machine's MIG mode is never changed here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

from rbee.contract import CollectorIssue, GpuDevice, GpuFault, GpuUtilSource, gpu_health

from .health import XidWatch, read_faults
from .process_util import ProcessUtilisation
from .source import GpuSnapshot, ProcessPlacement, Utilisation

MIB = 2**20


class NvmlSource:
    """NVML for every GPU of the host. ``nvml`` is the ``pynvml`` module, or a stub of it."""

    name = "nvml"

    def __init__(self, nvml: ModuleType | object | None = None, *, event_wait_s: float = 0.01,
                 xid_window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        self.clock = clock
        nvml.nvmlInit()  # raises nvml.NVMLError when there is no driver
        count = nvml.nvmlDeviceGetCount()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self._samplers = [ProcessUtilisation(nvml, h, monotonic=clock) for h in self.handles]
        self._physical = frozenset(self.uuids)
        self._sampled: dict[str, Utilisation] = {}
        """uuid → the latest per-process reading (replaced whole, so readers need no lock)."""
        self.xids = XidWatch(nvml, self.handles, self.uuids, event_wait_s, xid_window_s, clock)
        self._occupied: set[int] | None = None
        """GPUs with a process on them at the last refresh (None before the first)."""
        self._mig = [self._mig_instances(h) for h in self.handles]
        """Per GPU, its MIG instances' handles, or None when it is not in MIG mode. Read on the
        slow path: ``nvmlDeviceGetMigMode`` alone costs 0.17 ms on an H100, more than all of a
        refresh's other queries together; instances come and go only by an operator's hand."""

    # -- the fast path ---------------------------------------------------------------------

    def snapshot(self) -> GpuSnapshot:
        snapshot = GpuSnapshot()
        for index, handle in enumerate(self.handles):
            faults = read_faults(self.nvml, handle) + self.xids.faults(self.uuids[index])
            instances = self._mig[index]
            if instances is None:
                self._add_gpu(snapshot, index, handle, faults)
            else:
                self._add_mig(snapshot, index, handle, instances, faults)
        self._occupied = {placed.gpu_index for placements in snapshot.processes.values()
                          for placed in placements}
        return snapshot

    def _add_gpu(self, snapshot: GpuSnapshot, index: int, handle, faults: list[GpuFault]) -> None:
        nvml, uuid = self.nvml, self.uuids[index]
        errors: list[CollectorIssue] = []
        util = self._query(errors, "utilisation", nvml.nvmlDeviceGetUtilizationRates, handle)
        sm, memory_bw = (float(util.gpu), float(util.memory)) if util is not None else (None, None)
        snapshot.devices.append(self._device(
            index, uuid, self.names[index], handle, faults, errors, util_pct=sm,
            mem_util_pct=memory_bw,
            temperature_c=self._query(errors, "temperature", nvml.nvmlDeviceGetTemperature,
                                      handle, nvml.NVML_TEMPERATURE_GPU),
            power_w=_scaled(self._query(errors, "power", nvml.nvmlDeviceGetPowerUsage, handle),
                            1000)))
        snapshot.device_utilisation[uuid] = Utilisation(
            GpuUtilSource.DEVICE if util is not None else None, self.clock(), 0.0,
            device=(sm, memory_bw),
            problem=None if util is not None else errors[0].message)
        self._add_processes(snapshot, index, uuid, handle)

    def _add_mig(self, snapshot: GpuSnapshot, index: int, parent, instances: list,
                 faults: list[GpuFault]) -> None:
        nvml, parent_uuid = self.nvml, self.uuids[index]
        parent_errors: list[CollectorIssue] = []
        temperature = self._query(parent_errors, "temperature", nvml.nvmlDeviceGetTemperature,
                                  parent, nvml.NVML_TEMPERATURE_GPU)
        for handle in instances:
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            errors = [*parent_errors, CollectorIssue(
                collector="gpu", message="utilisation: not reported for MIG instances")]
            instance_id = self._query(errors, "GPU instance id", nvml.nvmlDeviceGetGpuInstanceId,
                                      handle)
            snapshot.devices.append(self._device(
                index, uuid, f"{self.names[index]} MIG {instance_id}", handle, faults, errors,
                util_pct=None, mem_util_pct=None, temperature_c=temperature, power_w=None,
                mig_parent_uuid=parent_uuid, mig_instance_id=instance_id))
            snapshot.device_utilisation[uuid] = Utilisation(
                None, self.clock(), 0.0, problem="not reported for MIG instances")
            self._add_processes(snapshot, index, uuid, handle)

    def _device(self, index: int, uuid: str, name: str, handle, faults: list[GpuFault],
                errors: list[CollectorIssue], **figures) -> GpuDevice:
        memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuDevice(
            index=index, uuid=uuid, name=name, vram_total_mb=round(memory.total / MIB, 1),
            vram_used_mb=round(memory.used / MIB, 1), vram_free_mb=round(memory.free / MIB, 1),
            health=gpu_health(faults), faults=faults, errors=errors, **figures)

    def _add_processes(self, snapshot: GpuSnapshot, index: int, uuid: str, handle) -> None:
        """Compute and graphics processes (a process in both is counted once)."""
        nvml = self.nvml
        seen = set()
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses,
                      nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                processes = query(handle)
            except nvml.NVMLError:
                continue
            for process in processes:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                used = process.usedGpuMemory
                snapshot.processes.setdefault(process.pid, []).append(ProcessPlacement(
                    gpu_index=index, uuid=uuid,
                    vram_mb=round(used / MIB, 1) if used is not None else None))

    def _mig_instances(self, handle) -> list | None:
        """The MIG instances of a GPU in MIG mode; None for a GPU not in MIG mode."""
        nvml = self.nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # NOT_SUPPORTED: no MIG on this GPU
            return None
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        instances = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                instances.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except nvml.NVMLError:  # NOT_FOUND: an empty slot
                continue
        return instances

    def _query(self, errors: list[CollectorIssue], figure: str, query, *args):
        try:
            return query(*args)
        except self.nvml.NVMLError as exc:
            errors.append(CollectorIssue(collector="gpu", message=f"{figure}: {exc}"))
            return None

    # -- the slow path ---------------------------------------------------------------------

    def sample(self) -> None:
        """Per-process utilisation of every GPU with a process on it, once; then the Xid events
        and MIG instances. A GPU with no process has nobody to attribute use to: its ~2.2 ms
        query (CPU, in the driver) is skipped, and the next one covers the samples since the
        last."""
        sampled = dict(self._sampled)
        occupied = self._occupied
        for index, sampler in enumerate(self._samplers):
            if occupied is None or index in occupied:
                sampled[self.uuids[index]] = sampler.sample()
            else:
                sampled[self.uuids[index]] = sampler.nobody()
        self._sampled = sampled
        self.xids.drain()
        self._mig = [self._mig_instances(h) for h in self.handles]

    def utilisation(self, uuid: str, snapshot: GpuSnapshot) -> Utilisation | None:
        """Per-process figures where the driver has them, else the device's (DEVICE), else
        unknown with the reason. Before the first sample a GPU's figure is unknown, not the
        device's: a device figure would make every idle worker on a busy GPU look busy."""
        sampled = self._sampled.get(uuid)
        if sampled is None:
            if uuid in self._physical:
                return Utilisation(None, self.clock(), 0.0, problem="no per-process sample yet")
            return snapshot.device_utilisation.get(uuid)  # a MIG instance: unknown, and why
        if sampled.unsupported:
            return snapshot.device_utilisation.get(uuid)
        return sampled

    def close(self) -> None:
        self.xids.close()
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _scaled(value: float | None, divisor: float) -> float | None:
    return None if value is None else round(value / divisor, 1)
