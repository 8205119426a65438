"""Where GPU numbers come from: NVML (``pynvml`` of the nvidia-ml-py distribution) or nvidia-smi.

Both sources answer one question, ``snapshot()``: the devices with their real VRAM totals, and which
processes use which GPU. Both block, so the hive calls them from a worker thread under a deadline.
nvidia-smi runs in its own process group and is killed with the whole group when it outlives its
timeout: it is known to hang for seconds on busy multi-GPU hosts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

from .._errors import CollectorError
from ..telemetry import GpuDevice

log = logging.getLogger(__name__)
MIB = 2**20


@dataclass(frozen=True, slots=True)
class ProcessGpuUse:
    gpu_index: int
    vram_mb: float
    util_pct: float | None
    """Per-process SM utilisation; None where the driver does not report it."""


@dataclass(slots=True)
class GpuSnapshot:
    devices: list[GpuDevice] = field(default_factory=list)
    processes: dict[int, list[ProcessGpuUse]] = field(default_factory=dict)


class GpuSource(Protocol):
    name: str

    def snapshot(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class NvmlSource:
    """NVML, initialised once. ``nvml`` is the ``pynvml`` module, or a stub with its interface."""

    name = "nvml"

    def __init__(self, nvml: ModuleType | object | None = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()  # raises nvml.NVMLError when there is no driver
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self.handles]
        self._last_sample_us = [0] * len(self.handles)

    def snapshot(self) -> GpuSnapshot:
        nvml = self.nvml
        snapshot = GpuSnapshot()
        for index, handle in enumerate(self.handles):
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            snapshot.devices.append(GpuDevice(
                index=index, uuid=self.uuids[index], name=self.names[index],
                util_pct=float(util.gpu), vram_total_mb=round(memory.total / MIB, 1),
                vram_used_mb=round(memory.used / MIB, 1), vram_free_mb=round(memory.free / MIB, 1),
                temperature_c=self._optional(nvml.nvmlDeviceGetTemperature, handle,
                                             nvml.NVML_TEMPERATURE_GPU),
                power_w=_scaled(self._optional(nvml.nvmlDeviceGetPowerUsage, handle), 1000),
            ))
            utilisation = self._process_utilisation(index, handle)
            for process in self._processes(handle):
                used = process.usedGpuMemory
                snapshot.processes.setdefault(process.pid, []).append(ProcessGpuUse(
                    gpu_index=index, vram_mb=round(used / MIB, 1) if used else 0.0,
                    util_pct=utilisation.get(process.pid),
                ))
        return snapshot

    def _processes(self, handle) -> list:
        nvml = self.nvml
        found = {}
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses,
                      nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for process in query(handle):
                    found.setdefault(process.pid, process)
            except nvml.NVMLError:
                continue
        return list(found.values())

    def _process_utilisation(self, index: int, handle) -> dict[int, float]:
        """SM % per PID from samples newer than the last call's; empty when none or unsupported."""
        try:
            samples = self.nvml.nvmlDeviceGetProcessUtilization(handle, self._last_sample_us[index])
        except self.nvml.NVMLError:
            return {}
        latest: dict[int, tuple[int, float]] = {}
        for sample in samples:
            if sample.pid not in latest or sample.timeStamp > latest[sample.pid][0]:
                latest[sample.pid] = (sample.timeStamp, float(sample.smUtil))
            self._last_sample_us[index] = max(self._last_sample_us[index], sample.timeStamp)
        return {pid: util for pid, (_, util) in latest.items()}

    def _optional(self, query, *args):
        try:
            return query(*args)
        except self.nvml.NVMLError:
            return None

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


GPU_QUERY = ("index,uuid,name,utilization.gpu,memory.total,memory.used,memory.free,"
             "temperature.gpu,power.draw")
APPS_QUERY = "pid,gpu_uuid,used_memory"


class NvidiaSmiSource:
    """nvidia-smi, asked only for query fields it documents, always under ``timeout_s``."""

    name = "nvidia-smi"

    def __init__(self, path: str = "nvidia-smi", timeout_s: float = 2.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._running: set[subprocess.Popen] = set()

    def snapshot(self) -> GpuSnapshot:
        snapshot = GpuSnapshot()
        by_uuid = {}
        for row in self._query(f"--query-gpu={GPU_QUERY}"):
            if len(row) != 9:
                raise CollectorError(f"nvidia-smi printed an unexpected row: {row!r}",
                                     collector="gpu")
            device = GpuDevice(
                index=int(row[0]), uuid=row[1], name=row[2], util_pct=_number(row[3]) or 0.0,
                vram_total_mb=_number(row[4]) or 0.0, vram_used_mb=_number(row[5]) or 0.0,
                vram_free_mb=_number(row[6]) or 0.0, temperature_c=_number(row[7]),
                power_w=_number(row[8]),
            )
            snapshot.devices.append(device)
            by_uuid[device.uuid] = device
        for row in self._query(f"--query-compute-apps={APPS_QUERY}"):
            if len(row) != 3 or not row[0].isdigit() or row[1] not in by_uuid:
                continue
            device = by_uuid[row[1]]
            snapshot.processes.setdefault(int(row[0]), []).append(
                ProcessGpuUse(gpu_index=device.index, vram_mb=_number(row[2]) or 0.0, util_pct=None)
            )
        return snapshot

    def _query(self, query: str) -> list[list[str]]:
        output = run_with_timeout([self.path, query, "--format=csv,noheader,nounits"],
                                  self.timeout_s, self._running)
        return [[cell.strip() for cell in line.split(",")]
                for line in output.splitlines() if line.strip()]

    def close(self) -> None:
        """Kill an nvidia-smi still running (a refresh abandoned at its deadline, at shutdown):
        it must not outlive the hive."""
        for process in list(self._running):
            _kill_group(process)


def run_with_timeout(argv: Sequence[str], timeout_s: float,
                     running: set[subprocess.Popen] | None = None) -> str:
    """stdout of ``argv``; kills its whole process group and raises CollectorError on timeout.
    While it runs, the process is in ``running`` (if given), so an owner can kill it early."""
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise CollectorError(f"cannot run {argv[0]}: {exc.strerror}", collector="gpu") from exc
    running = set() if running is None else running
    running.add(process)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        raise CollectorError(f"{argv[0]} did not answer within {timeout_s:g}s and was killed",
                             collector="gpu") from None
    finally:
        running.discard(process)
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip() or stdout.decode(errors="replace").strip()
        raise CollectorError(f"{argv[0]} failed ({process.returncode}): {message[:200]}",
                             collector="gpu")
    return stdout.decode(errors="replace")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def open_gpu_source(kind: str, nvidia_smi_path: str = "nvidia-smi", timeout_s: float = 2.0,
                    nvml: object | None = None) -> GpuSource | None:
    """The source for ``kind`` ("auto", "nvml", "nvidia-smi", "none"); None when there is no GPU.

    "auto" prefers NVML, then nvidia-smi when it is on PATH, then nothing, quietly: a host without
    a GPU is normal. An explicit choice that cannot work raises CollectorError.
    """
    if kind == "none":
        return None
    if kind in ("auto", "nvml"):
        try:
            return NvmlSource(nvml)
        except Exception as exc:  # NVMLError, or the library missing altogether
            if kind == "nvml":
                raise CollectorError(f"NVML is not usable: {exc}", collector="gpu") from exc
            log.debug("NVML not usable (%s); trying nvidia-smi", exc)
    from shutil import which

    if which(nvidia_smi_path) is None:
        if kind == "nvidia-smi":
            raise CollectorError(f"{nvidia_smi_path} not found on PATH", collector="gpu")
        return None
    return NvidiaSmiSource(nvidia_smi_path, timeout_s)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _scaled(value: float | None, divisor: float) -> float | None:
    return None if value is None else round(value / divisor, 1)
