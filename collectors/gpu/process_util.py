"""Per-process GPU utilisation from NVML samples, read the way nvidia-smi pmon and nvitop read it.

``nvmlDeviceGetProcessUtilization(handle, lastSeen)`` returns the samples newer than ``lastSeen``
(microseconds of the CPU clock), one per process per driver sampling period in which the process
ran. So the figure of a process over a window is the average of its samples in that window, and a
process with no sample in it did not run: 0 %, not "unknown". That is what makes an idle worker
that holds memory idle (a real H100 showed it: one sample from its start, none after). With no
sample at all the driver answers NVML_ERROR_NOT_FOUND: every process is at 0 %. NOT_SUPPORTED is
the one answer that means "unknown here", and the caller falls back to the device's figure.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable

from rbee.contract import GpuUtilSource

from .source import Utilisation

log = logging.getLogger("rbee.collectors.gpu")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class SingleCallQuery:
    """``nvmlDeviceGetProcessUtilization`` in one driver call, into a buffer kept between calls.

    pynvml's wrapper asks twice when there are samples (the size, then the data); on an H100
    (driver 580) one call here cost 2.2 ms of CPU against the wrapper's 2.7 ms, and 2.16 against
    2.56 ms with nothing to return. Used where the module exposes pynvml's function lookup and
    sample struct (the real ``pynvml``); elsewhere the public wrapper is called.

    ``_nvmlGetFunctionPointer`` is pynvml's private lookup, so it is never trusted to be there
    or to work: ``process_query`` falls back to the public wrapper when it is missing or raises,
    and ``ProcessUtilisation`` when the call through it fails other than with an NVML answer."""

    SUCCESS, INSUFFICIENT_SIZE = 0, 7

    def __init__(self, nvml, handle, capacity: int = 128) -> None:
        self.nvml = nvml
        self.handle = handle
        self.function = nvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
        self.buffer = (nvml.c_nvmlProcessUtilizationSample_t * capacity)()

    @classmethod
    def available(cls, nvml) -> bool:
        return (callable(getattr(nvml, "_nvmlGetFunctionPointer", None))
                and hasattr(nvml, "c_nvmlProcessUtilizationSample_t"))

    @classmethod
    def process_query(cls, nvml, handle) -> Callable[[object, int], list]:
        """This query where pynvml's private lookup gives it, else pynvml's public wrapper: a
        pynvml without the lookup, or a library without the symbol (the lookup raises
        ``NVMLError``, FUNCTION_NOT_FOUND), costs the faster path only, never the hive."""
        if cls.available(nvml):
            try:
                return cls(nvml, handle)
            except (nvml.NVMLError, AttributeError, TypeError, ValueError) as exc:
                log.info("per-process GPU utilisation through pynvml's wrapper: its function "
                         "lookup failed (%s: %s)", type(exc).__name__, exc)
        return nvml.nvmlDeviceGetProcessUtilization

    def __call__(self, handle, last_seen_us: int) -> list:
        count = ctypes.c_uint(len(self.buffer))
        result = self.function(handle, self.buffer, ctypes.byref(count),
                               ctypes.c_ulonglong(last_seen_us))
        if result == self.INSUFFICIENT_SIZE:  # more samples than room: grow, and ask again
            self.buffer = (self.nvml.c_nvmlProcessUtilizationSample_t * (count.value * 2))()
            return self(handle, last_seen_us)
        if result != self.SUCCESS:
            raise self.nvml.NVMLError(result)
        return self.buffer[: count.value]


class ProcessUtilisation:
    """The per-process utilisation of one GPU, sampled since the previous call."""

    def __init__(self, nvml, handle, first_window_s: float = 1.0,
                 clock_us: Callable[[], int] = wall_clock_us,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.handle = handle
        self._clock_us = clock_us
        self._monotonic = monotonic
        self.last_seen_us = clock_us() - int(first_window_s * 1e6)
        """Samples at or before this were counted already (or predate the hive: an old sample of
        a process that since went idle must not count)."""
        self._queried_us = self.last_seen_us
        self._query = SingleCallQuery.process_query(nvml, handle)

    def nobody(self) -> Utilisation:
        """No process on the GPU: every (absent) process is at 0 %, without asking the driver.
        ``last_seen`` stays, so the next query counts every sample since the last one."""
        return Utilisation(GpuUtilSource.PROCESS, self._monotonic(), 0.0)

    def sample(self) -> Utilisation:
        nvml = self.nvml
        now_us = self._clock_us()
        window_s = max(0.0, (now_us - self._queried_us) / 1e6)
        self._queried_us = now_us
        try:
            samples = self._samples()
        except nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == nvml.NVML_ERROR_NOT_FOUND:  # no process ran since last_seen
                return Utilisation(GpuUtilSource.PROCESS, self._monotonic(), window_s)
            if code == nvml.NVML_ERROR_NOT_SUPPORTED:
                return Utilisation(None, self._monotonic(), window_s, unsupported=True,
                                   problem=f"per-process utilisation: {exc}")
            return Utilisation(None, self._monotonic(), window_s,
                               problem=f"per-process utilisation failed: {exc}")
        totals: dict[int, list[float]] = {}
        last_seen = self.last_seen_us
        for sample in samples:
            if sample.timeStamp <= self.last_seen_us:
                continue  # some drivers return the boundary sample again
            entry = totals.setdefault(sample.pid, [0.0, 0.0, 0])
            entry[0] += _percent(sample.smUtil)
            entry[1] += _percent(sample.memUtil)
            entry[2] += 1
            last_seen = max(last_seen, sample.timeStamp)
        self.last_seen_us = last_seen
        per_pid = {pid: (round(sm / n, 1), round(mem / n, 1)) for pid, (sm, mem, n) in totals.items()}
        return Utilisation(GpuUtilSource.PROCESS, self._monotonic(), window_s, per_pid=per_pid)


    def _samples(self) -> list:
        """The samples since ``last_seen_us``. A single-call query that fails other than with an
        NVML answer (pynvml's internals changed shape: a ctypes or type error) is dropped for
        pynvml's public wrapper, for good, and the wrapper asked at once."""
        try:
            return self._query(self.handle, self.last_seen_us)
        except (ctypes.ArgumentError, TypeError, AttributeError, ValueError) as exc:
            if not isinstance(self._query, SingleCallQuery):
                raise
            log.warning("per-process GPU utilisation through pynvml's wrapper from now on: the "
                        "single call failed (%s: %s)", type(exc).__name__, exc)
            self._query = self.nvml.nvmlDeviceGetProcessUtilization
            return self._query(self.handle, self.last_seen_us)


def _percent(value: int) -> float:
    """Samples are 0-100; drivers have been seen returning the unsigned -1 for "no value"."""
    return float(value) if 0 <= value <= 100 else 0.0
