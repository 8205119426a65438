"""nvidia-smi, the fallback where NVML cannot be loaded: asked only for query fields it documents,
always under a timeout, in its own process group, killed with the whole group when it outlives the
timeout (it is known to hang for seconds on busy multi-GPU hosts).

nvidia-smi gives no per-process utilisation, so every worker gets its device's figure, marked
``device``; it lists no MIG instances either (MIG needs NVML). Health comes from a query of its
own, so that a driver whose nvidia-smi lacks one of those fields loses only the health figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

from rbee._errors import CollectorError
from rbee.contract import CollectorIssue, GpuDevice, GpuFault, GpuFaultKind, GpuUtilSource, gpu_health

from .source import GpuSnapshot, ProcessPlacement, Utilisation

GPU_QUERY = ("index,uuid,name,utilization.gpu,memory.total,memory.used,memory.free,"
             "temperature.gpu,power.draw,utilization.memory")
APPS_QUERY = "pid,gpu_uuid,used_memory"
HEALTH_QUERY = ("index,ecc.errors.uncorrected.volatile.total,retired_pages.pending,"
                "remapped_rows.pending,remapped_rows.failure,"
                "clocks_throttle_reasons.hw_slowdown,clocks_throttle_reasons.hw_thermal_slowdown,"
                "clocks_throttle_reasons.sw_thermal_slowdown,"
                "clocks_throttle_reasons.hw_power_brake_slowdown")


class NvidiaSmiSource:
    name = "nvidia-smi"

    def __init__(self, path: str = "nvidia-smi", timeout_s: float = 2.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._running: set[subprocess.Popen] = set()

    def snapshot(self) -> GpuSnapshot:
        snapshot = GpuSnapshot()
        faults, health_problem = self._health()
        by_uuid = {}
        for row in self._query(f"--query-gpu={GPU_QUERY}"):
            if len(row) != 10:
                raise CollectorError(f"nvidia-smi printed an unexpected row: {row!r}",
                                     collector="gpu")
            index = int(row[0])
            errors = [CollectorIssue(collector="gpu", message=f"{name}: nvidia-smi says {row[i]}")
                      for i, name in ((3, "utilisation"), (7, "temperature"), (8, "power"))
                      if _number(row[i]) is None]
            if health_problem:
                errors.append(CollectorIssue(collector="gpu", message=health_problem))
            device = GpuDevice(
                index=index, uuid=row[1], name=row[2], util_pct=_number(row[3]),
                vram_total_mb=_number(row[4]) or 0.0, vram_used_mb=_number(row[5]) or 0.0,
                vram_free_mb=_number(row[6]) or 0.0, temperature_c=_number(row[7]),
                power_w=_number(row[8]), mem_util_pct=_number(row[9]),
                health=gpu_health(faults.get(index, [])), faults=faults.get(index, []),
                errors=errors,
            )
            snapshot.devices.append(device)
            by_uuid[device.uuid] = device
            snapshot.device_utilisation[device.uuid] = Utilisation(
                GpuUtilSource.DEVICE if device.util_pct is not None else None, time.monotonic(),
                0.0, device=(device.util_pct, device.mem_util_pct),
                problem=None if device.util_pct is not None else f"utilisation: {row[3]}")
        for row in self._query(f"--query-compute-apps={APPS_QUERY}"):
            if len(row) != 3 or not row[0].isdigit() or row[1] not in by_uuid:
                continue
            device = by_uuid[row[1]]
            snapshot.processes.setdefault(int(row[0]), []).append(
                ProcessPlacement(gpu_index=device.index, uuid=device.uuid,
                                 vram_mb=_number(row[2])))
        return snapshot

    def _health(self) -> tuple[dict[int, list[GpuFault]], str | None]:
        try:
            rows = self._query(f"--query-gpu={HEALTH_QUERY}")
        except CollectorError as exc:
            return {}, f"health unknown: {exc}"
        faults: dict[int, list[GpuFault]] = {}
        for row in rows:
            if len(row) != 9 or not row[0].isdigit():
                continue
            found = faults.setdefault(int(row[0]), [])
            if (_number(row[1]) or 0) > 0:
                found.append(GpuFault(kind=GpuFaultKind.ECC_UNCORRECTED, fatal=True,
                                      detail=f"{row[1]} uncorrected ECC errors since the driver loaded"))
            if row[2] == "Yes":
                found.append(GpuFault(kind=GpuFaultKind.RETIRED_PAGES_PENDING, fatal=True,
                                      detail="pages wait to be retired: reset the GPU"))
            if row[3] == "Yes":
                found.append(GpuFault(kind=GpuFaultKind.REMAPPED_ROWS_PENDING, fatal=True,
                                      detail="rows wait to be remapped: reset the GPU"))
            if row[4] == "Yes":
                found.append(GpuFault(kind=GpuFaultKind.ROW_REMAP_FAILURE, fatal=True,
                                      detail="a row remap failed: the GPU needs service"))
            for cell, kind, detail in (
                    (row[5], GpuFaultKind.HW_SLOWDOWN, "hardware slowdown (clocks cut by half or more)"),
                    (row[6], GpuFaultKind.THERMAL_SLOWDOWN, "hardware thermal slowdown"),
                    (row[7], GpuFaultKind.THERMAL_SLOWDOWN, "software thermal slowdown"),
                    (row[8], GpuFaultKind.POWER_BRAKE, "external power brake")):
                if cell == "Active":
                    found.append(GpuFault(kind=kind, fatal=False, detail=detail))
        return faults, None

    def sample(self) -> None:
        """Nothing: nvidia-smi has no per-process utilisation to sample."""

    def utilisation(self, uuid: str, snapshot: GpuSnapshot) -> Utilisation | None:
        return snapshot.device_utilisation.get(uuid)

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


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None
