"""What every GPU source answers: the devices, and which processes hold memory on which device.

Two questions with two costs (measured on an H100, ``../README``): the device figures and process
lists cost microseconds per GPU and are the *refresh* (``snapshot``), which a tick may wait for;
per-process utilisation costs 1.4-2.6 ms per GPU whatever is asked, so it is the *sample*
(``sample``), run once per tick on its own thread. The per-worker hook joins the two at
collection time, so a utilisation figure is never older than one tick plus its own cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rbee.contract import GpuDevice, GpuUtilSource


@dataclass(frozen=True, slots=True)
class ProcessPlacement:
    """One process on one device (GPU or MIG instance), as the driver's process list shows it."""

    gpu_index: int
    uuid: str
    vram_mb: float | None
    """None where the driver does not report it (NVML_VALUE_NOT_AVAILABLE)."""


@dataclass(frozen=True, slots=True)
class Utilisation:
    """The utilisation figures one device gives for its processes at one moment.

    ``source`` PROCESS: ``per_pid`` holds the average SM and memory % of each process's samples
    in the window; a process that is not in it had no sample, so it did not run: 0 %.
    ``source`` DEVICE: per-process figures are unsupported; ``device`` is the whole GPU's figure,
    given to every process on it. ``source`` None: unknown, ``problem`` says why."""

    source: GpuUtilSource | None
    at: float
    """``time.monotonic()`` when the figure was read."""
    window_s: float
    per_pid: dict[int, tuple[float, float]] = field(default_factory=dict)
    device: tuple[float | None, float | None] = (None, None)
    problem: str | None = None
    unsupported: bool = False
    """The driver does not support per-process figures here: use the device's instead."""

    def of(self, pid: int) -> tuple[float | None, float | None]:
        """SM and memory-bandwidth % of ``pid`` on this device, (None, None) when unknown."""
        if self.source is GpuUtilSource.PROCESS:
            return self.per_pid.get(pid, (0.0, 0.0))
        return self.device


@dataclass(slots=True)
class GpuSnapshot:
    devices: list[GpuDevice] = field(default_factory=list)
    processes: dict[int, list[ProcessPlacement]] = field(default_factory=dict)
    """PID → where it holds memory."""
    device_utilisation: dict[str, Utilisation] = field(default_factory=dict)
    """uuid → the device-wide figure read with this snapshot (the fallback)."""


class GpuSource(Protocol):
    name: str

    def snapshot(self) -> GpuSnapshot:
        """The fast part: devices, health, process lists. Blocking; microseconds per GPU."""

    def sample(self) -> None:
        """The slow part (per-process utilisation, driver events), once per tick, on a thread of
        its own. Blocking."""

    def utilisation(self, uuid: str, snapshot: GpuSnapshot) -> Utilisation | None:
        """The freshest utilisation of device ``uuid`` for its processes."""

    def close(self) -> None: ...
