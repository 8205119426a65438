"""Stand-ins for what this machine does not have: a GPU, nvidia-smi and the NVML library.

Used only for the GPU; everything else in the suite is real. The fake nvidia-smi prints what the
real one prints for the same query flags (CSV, noheader, nounits); the NVML stub implements the
subset of the ``pynvml`` interface that ``rbee.hive.gpu.NvmlSource`` calls, with the same names,
return shapes and error class.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

GPUS = [
    # index, uuid, name, util %, total MiB, used MiB, free MiB, temperature, power W
    (0, "GPU-0a1b2c3d-0000-1111-2222-333344445555", "NVIDIA A100-SXM4-80GB", 12, 81559, 1024,
     80535, 41, 88.12),
    (1, "GPU-9f8e7d6c-0000-1111-2222-333344445555", "NVIDIA H100 NVL", 37, 97871, 20480,
     77391, 55, 301.5),
]


def write_fake_nvidia_smi(directory: Path, apps: list[tuple[int, int, int]] = (),
                          hang_s: float = 0.0) -> Path:
    """Put an executable ``nvidia-smi`` in ``directory``. ``apps``: (pid, gpu index, MiB)."""
    gpu_rows = "\n".join(", ".join(str(c) for c in gpu) for gpu in GPUS)
    app_rows = "\n".join(f"{pid}, {GPUS[index][1]}, {mib}" for pid, index, mib in apps)
    script = directory / "nvidia-smi"
    hang = f"sleep {hang_s}\n" if hang_s else ""
    script.write_text(
        "#!/bin/sh\n"
        f"{hang}"
        'case "$1" in\n'
        f"  --query-gpu=*) cat <<'EOF'\n{gpu_rows}\nEOF\n;;\n"
        f"  --query-compute-apps=*) cat <<'EOF'\n{app_rows}\nEOF\n;;\n"
        '  *) echo "Invalid combination of input arguments." >&2; exit 2;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return script


class NVMLError(Exception):
    pass


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


class StubNvml:
    """A stub of the pynvml module for one or more GPUs and the processes placed on them."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus=GPUS) -> None:
        self.gpus = list(gpus)
        self.processes: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(len(gpus))}
        self.initialised = 0
        self.shutdowns = 0

    def place(self, gpu: int, pid: int, mib: int, sm_util: int) -> None:
        self.processes[gpu].append((pid, mib, sm_util))

    def nvmlInit(self):
        self.initialised += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle][2]

    def nvmlDeviceGetUUID(self, handle):
        return self.gpus[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self.gpus[handle]
        return _Memory(total=gpu[4] * 2**20, used=gpu[5] * 2**20, free=gpu[6] * 2**20)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return _Utilization(gpu=self.gpus[handle][3], memory=0)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return self.gpus[handle][7]

    def nvmlDeviceGetPowerUsage(self, handle):
        raise NVMLError("Not Supported")  # as on GPUs without a power sensor

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [_Process(pid, mib * 2**20) for pid, mib, _ in self.processes[handle]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []

    def nvmlDeviceGetProcessUtilization(self, handle, since):
        samples = [_ProcessSample(pid, 10**12 + i, util, 0)
                   for i, (pid, _, util) in enumerate(self.processes[handle])]
        if not samples:
            raise NVMLError("Not Found")
        return samples


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
