"""Stand-ins for what this machine does not have: a GPU, nvidia-smi and the NVML library.

Used only for the GPU; everything else in the suite is real. The fake nvidia-smi prints what the
real one prints for the same query flags (CSV, noheader, nounits); the NVML stub implements the
subset of the ``pynvml`` interface that ``rbee.collectors.gpu.nvml.NvmlSource`` calls, with the same names,
return shapes and error class.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

GPUS = [
    # index, uuid, name, util %, total MiB, used MiB, free MiB, temperature, power W
    (0, "GPU-0a1b2c3d-0000-1111-2222-333344445555", "NVIDIA A100-SXM4-80GB", 12, 81559, 1024,
     80535, 41, 88.12),
    (1, "GPU-9f8e7d6c-0000-1111-2222-333344445555", "NVIDIA H100 NVL", 37, 97871, 20480,
     77391, 55, 301.5),
]
MEMORY_UTIL = (3, 9)  # utilization.memory of each GPU


def write_fake_nvidia_smi(directory: Path, apps: list[tuple[int, int, int]] = (),
                          hang_s: float = 0.0, health_rows: list[str] | None = None) -> Path:
    """Put an executable ``nvidia-smi`` in ``directory``. ``apps``: (pid, gpu index, MiB).
    ``health_rows``: the health query's rows (default: healthy GPUs, ECC counts 0)."""
    gpu_rows = "\n".join(", ".join(str(c) for c in gpu) + f", {MEMORY_UTIL[gpu[0]]}"
                         for gpu in GPUS)
    app_rows = "\n".join(f"{pid}, {GPUS[index][1]}, {mib}" for pid, index, mib in apps)
    if health_rows is None:
        health_rows = [f"{gpu[0]}, 0, No, No, No, Not Active, Not Active, Not Active, Not Active"
                       for gpu in GPUS]
    health = "\n".join(health_rows)
    script = directory / "nvidia-smi"
    hang = f"sleep {hang_s}\n" if hang_s else ""
    script.write_text(
        "#!/bin/sh\n"
        f"{hang}"
        'case "$1" in\n'
        f"  --query-gpu=index,uuid,*) cat <<'EOF'\n{gpu_rows}\nEOF\n;;\n"
        f"  --query-gpu=index,ecc*) cat <<'EOF'\n{health}\nEOF\n;;\n"
        f"  --query-compute-apps=*) cat <<'EOF'\n{app_rows}\nEOF\n;;\n"
        '  *) echo "Invalid combination of input arguments." >&2; exit 2;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return script


# -- the NVML stub: pynvml's names, return shapes, error codes and sampling semantics ------------

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
_ERROR_TEXT = {3: "Not Supported", 6: "Not Found", 9: "Driver Not Loaded", 10: "Timeout",
               12: "NVML Shared Library Not Found", 13: "Function Not Found"}


class NVMLError(Exception):
    """As pynvml's: the error code in ``value``, its text as the message."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


@dataclass
class _ProcessSample:
    pid: int
    timeStamp: int
    smUtil: int
    memUtil: int
    encUtil: int = 0
    decUtil: int = 0


@dataclass
class _EventData:
    device: object
    eventType: int
    eventData: int
    gpuInstanceId: int = 0
    computeInstanceId: int = 0


@dataclass
class StubMig:
    """One MIG instance, as a GPU in MIG mode shows it."""

    uuid: str
    gpu_instance_id: int
    total_mib: int
    used_mib: int
    processes: list[tuple[int, int]] = field(default_factory=list)
    """(pid, MiB)"""


@dataclass
class StubGpu:
    """What the driver knows of one GPU; tests change these fields to move the figures."""

    index: int
    uuid: str
    name: str
    util: int | None
    total_mib: int
    used_mib: int
    free_mib: int
    temperature: int
    power_mw: int | None = None
    """None: no power sensor (NOT_SUPPORTED), as on many GPUs."""
    mem_util: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    """(pid, MiB or None where the driver withholds it)"""
    samples: list[_ProcessSample] = field(default_factory=list)
    per_process_util: bool = True
    ecc_uncorrected: int | None = 0
    retired_pages_pending: bool | None = None
    """None: not supported (Ampere and later remap rows instead)."""
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    clock_event_reasons: int = 0
    mig: list[StubMig] | None = None
    """None: MIG not supported; a list (maybe empty): MIG mode on, with these instances."""


class c_nvmlProcessUtilizationSample_t(ctypes.Structure):  # pynvml's name
    _fields_ = [("pid", ctypes.c_uint), ("timeStamp", ctypes.c_ulonglong),
                ("smUtil", ctypes.c_uint), ("memUtil", ctypes.c_uint),
                ("encUtil", ctypes.c_uint), ("decUtil", ctypes.c_uint)]


def now_us() -> int:
    return time.time_ns() // 1000


class StubNvml:
    """A stub of the pynvml module, modelled on the real API as a real H100 answered it:

    - ``nvmlDeviceGetProcessUtilization(handle, lastSeen)`` returns only samples newer than
      ``lastSeen``; with none it raises NOT_FOUND; where unsupported, NOT_SUPPORTED.
    - MIG: ``nvmlDeviceGetMigMode`` → [current, pending]; instances through
      ``nvmlDeviceGetMaxMigDeviceCount`` / ``nvmlDeviceGetMigDeviceHandleByIndex`` (NOT_FOUND for an
      empty slot); memory and processes per instance; no utilisation for an instance.
    - Xid events through an event set, ``nvmlEventSetWait`` raising TIMEOUT when none is queued.
    ``driver=False`` stands for a host whose NVML library or driver is missing."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FEATURE_ENABLED = 1
    NVML_DEVICE_MIG_ENABLE = 1
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(self, gpus=GPUS, *, driver: bool = True) -> None:
        self.gpus = [StubGpu(index=g[0], uuid=g[1], name=g[2], util=g[3], total_mib=g[4],
                             used_mib=g[5], free_mib=g[6], temperature=g[7]) for g in gpus]
        self.driver = driver
        self.initialised = 0
        self.shutdowns = 0
        self.calls: dict[str, int] = {}
        self._events: list[_EventData] = []
        self._event_sets = 0

    # -- what a test does to the "hardware" --------------------------------------------------

    def place(self, gpu: int, pid: int, mib: int | None, sm_util: int = 0) -> None:
        """A process holding ``mib`` on ``gpu``; with ``sm_util`` it also ran there just now."""
        self.gpus[gpu].processes.append((pid, mib))
        if sm_util:
            self.run(gpu, pid, sm_util)

    def run(self, gpu: int, pid: int, sm_util: int, mem_util: int = 0, at_us: int | None = None
            ) -> None:
        """One driver sample of ``pid`` on ``gpu`` (now, unless ``at_us``)."""
        self.gpus[gpu].samples.append(_ProcessSample(pid, at_us or now_us(), sm_util, mem_util))

    def xid(self, gpu: int, code: int) -> None:
        self._events.append(_EventData(("gpu", gpu), self.nvmlEventTypeXidCriticalError, code))

    # -- the pynvml interface ---------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _gpu(self, handle) -> StubGpu:
        if handle[0] != "gpu":
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return self.gpus[handle[1]]

    def _mig(self, handle) -> StubMig:
        return self.gpus[handle[1]].mig[handle[2]]

    def nvmlInit(self):
        if not self.driver:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialised += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle).uuid if handle[0] == "gpu" else self._mig(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        if handle[0] == "mig":
            mig = self._mig(handle)
            return _Memory(total=mig.total_mib * 2**20, used=mig.used_mib * 2**20,
                           free=(mig.total_mib - mig.used_mib) * 2**20)
        gpu = self._gpu(handle)
        return _Memory(total=gpu.total_mib * 2**20, used=gpu.used_mib * 2**20,
                       free=gpu.free_mib * 2**20)

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._gpu(handle)  # a MIG instance: NOT_SUPPORTED, as on real hardware
        if gpu.util is None or gpu.mig is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return _Utilization(gpu=gpu.util, memory=gpu.mem_util)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self._gpu(handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        gpu = self._gpu(handle)
        if gpu.power_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self._count("processes")
        if handle[0] == "mig":
            return [_Process(pid, mib * 2**20) for pid, mib in self._mig(handle).processes]
        return [_Process(pid, None if mib is None else mib * 2**20)
                for pid, mib in self._gpu(handle).processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []

    def nvmlDeviceGetProcessUtilization(self, handle, timeStamp):
        """pynvml's wrapper (which asks the library twice: the size, then the samples)."""
        samples = self._process_samples(handle, timeStamp)
        self._count("process_utilization")
        return samples

    def _process_samples(self, handle, since: int) -> list[_ProcessSample]:
        gpu = self._gpu(handle)
        if not gpu.per_process_util or gpu.mig is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        samples = [s for s in gpu.samples if s.timeStamp > since]
        if not samples:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return samples

    # The C library's own entry point, as pynvml looks it up, with its sample struct: the
    # hive's single-call query fills a buffer of its own through it.
    c_nvmlProcessUtilizationSample_t = c_nvmlProcessUtilizationSample_t

    def _nvmlGetFunctionPointer(self, name):
        assert name == "nvmlDeviceGetProcessUtilization", name

        def get_process_utilization(handle, buffer, count_ref, since) -> int:
            self._count("process_utilization")
            try:
                samples = self._process_samples(handle, since.value)
            except NVMLError as exc:
                return exc.value
            count = count_ref._obj
            if buffer is None or len(buffer) < len(samples):
                count.value = len(samples)
                return 7  # NVML_ERROR_INSUFFICIENT_SIZE
            for slot, sample in zip(buffer, samples, strict=False):
                slot.pid, slot.timeStamp = sample.pid, sample.timeStamp
                slot.smUtil, slot.memUtil = sample.smUtil, sample.memUtil
            count.value = len(samples)
            return 0

        return get_process_utilization

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        gpu = self._gpu(handle)
        if gpu.ecc_uncorrected is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.ecc_uncorrected

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle):
        gpu = self._gpu(handle)
        if gpu.retired_pages_pending is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(gpu.retired_pages_pending)

    def nvmlDeviceGetRemappedRows(self, handle):
        gpu = self._gpu(handle)
        if gpu.remapped_rows is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.remapped_rows

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._gpu(handle).clock_event_reasons

    def nvmlDeviceGetMigMode(self, handle):
        gpu = self._gpu(handle)
        if gpu.mig is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        gpu = self._gpu(handle)
        if index >= len(gpu.mig or ()):
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return ("mig", handle[1], index)

    def nvmlDeviceGetGpuInstanceId(self, handle):
        return self._mig(handle).gpu_instance_id

    def nvmlEventSetCreate(self):
        self._event_sets += 1
        return ("event-set", self._event_sets)

    def nvmlDeviceRegisterEvents(self, handle, event_types, event_set):
        self._gpu(handle)

    def nvmlEventSetWait(self, event_set, timeout_ms):
        if not self._events:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        return self._events.pop(0)

    def nvmlEventSetFree(self, event_set):
        self._event_sets -= 1


def processes_left(pattern: str) -> list[int]:
    """PIDs of live processes whose command line contains ``pattern``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                state = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if pattern.encode() in cmdline and b") Z" not in state:
                found.append(int(entry))
    return found
