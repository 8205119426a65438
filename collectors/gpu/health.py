"""GPU health as DCGM's health watches judge it, read through NVML.

Fatal (the GPU is unhealthy; work on it is at risk and scheduling skips it): uncorrected ECC
errors since the driver loaded, pages or rows waiting to be retired or remapped (a reset is
needed), a failed row remap, and the Xid errors NVIDIA lists as needing a reset or a replacement.
Not fatal (degraded: it runs, slower): hardware slowdown, thermal slowdown and the power brake.
The software power cap, idle and application clocks are how a healthy GPU runs, and are not faults.

A check the GPU does not support (ECC on a card without it, page retirement on Ampere and later,
which remaps rows instead) is simply not made: it is no fault and no error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rbee.contract import GpuFault, GpuFaultKind

log = logging.getLogger(__name__)

# nvmlClocksEventReason* (formerly nvmlClocksThrottleReason*) bits and what they mean for health.
SLOWDOWN_REASONS = (
    (0x08, GpuFaultKind.HW_SLOWDOWN, "hardware slowdown (clocks cut by half or more)"),
    (0x20, GpuFaultKind.THERMAL_SLOWDOWN, "software thermal slowdown"),
    (0x40, GpuFaultKind.THERMAL_SLOWDOWN, "hardware thermal slowdown"),
    (0x80, GpuFaultKind.POWER_BRAKE, "external power brake"),
)

FATAL_XIDS = {
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}
"""Xids after which NVIDIA's catalogue says to reset the GPU (or replace it). Others (13, 31, 43,
… mostly an application's own fault) degrade the GPU for ``xid_window_s``."""


def read_faults(nvml, handle) -> list[GpuFault]:
    """The standing faults of one physical GPU. Cheap: four NVML queries of a few µs each."""
    faults: list[GpuFault] = []
    uncorrected = _supported(nvml, nvml.nvmlDeviceGetTotalEccErrors, handle,
                             nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
    if uncorrected:
        faults.append(GpuFault(kind=GpuFaultKind.ECC_UNCORRECTED, fatal=True,
                               detail=f"{uncorrected} uncorrected ECC errors since the driver loaded"))
    if _supported(nvml, nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle) == \
            nvml.NVML_FEATURE_ENABLED:
        faults.append(GpuFault(kind=GpuFaultKind.RETIRED_PAGES_PENDING, fatal=True,
                               detail="pages wait to be retired: reset the GPU"))
    remapped = _supported(nvml, nvml.nvmlDeviceGetRemappedRows, handle)
    if remapped is not None:
        _corrected, _uncorrected, pending, failure = remapped
        if pending:
            faults.append(GpuFault(kind=GpuFaultKind.REMAPPED_ROWS_PENDING, fatal=True,
                                   detail="rows wait to be remapped: reset the GPU"))
        if failure:
            faults.append(GpuFault(kind=GpuFaultKind.ROW_REMAP_FAILURE, fatal=True,
                                   detail="a row remap failed: the GPU needs service"))
    reasons = _supported(nvml, _clock_event_reasons(nvml), handle)
    for bit, kind, detail in SLOWDOWN_REASONS:
        if reasons and reasons & bit:
            faults.append(GpuFault(kind=kind, fatal=False, detail=detail))
    return faults


def _clock_event_reasons(nvml) -> Callable:
    return getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons


def _supported(nvml, query: Callable, *args):
    """The answer, or None when the GPU does not support (or refuses) this check."""
    try:
        return query(*args)
    except nvml.NVMLError:
        return None


@dataclass(frozen=True, slots=True)
class XidEvent:
    uuid: str
    xid: int
    at: float


class XidWatch:
    """Xid errors from NVML's critical-error events, drained with a short wait once per sample.

    Fatal Xids stay until the hive restarts (the GPU needs a reset, which restarts the hive's
    NVML view too); the others fade after ``window_s``."""

    def __init__(self, nvml, handles: list, uuids: list[str], wait_s: float, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.wait_ms = max(0, int(wait_s * 1000))
        self.window_s = window_s
        self.clock = clock
        self.events: list[XidEvent] = []
        self.event_set = None
        self.unsupported: list[str] = []
        try:
            self.event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.info("NVML events unavailable (%s): Xid errors are not watched", exc)
            return
        for handle, uuid in zip(handles, uuids, strict=True):
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError,
                                              self.event_set)
            except nvml.NVMLError as exc:
                self.unsupported.append(uuid)
                log.info("GPU %s: Xid events unavailable (%s)", uuid, exc)

    def drain(self, max_events: int = 64) -> None:
        """Wait up to ``wait_s`` for the first event, then take what is queued without waiting."""
        if self.event_set is None:
            return
        nvml = self.nvml
        wait_ms = self.wait_ms
        for _ in range(max_events):
            try:
                data = nvml.nvmlEventSetWait(self.event_set, wait_ms)
            except nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing (more) queued
                break
            wait_ms = 0
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError:
                continue
            self.events.append(XidEvent(uuid, int(data.eventData), self.clock()))
        horizon = self.clock() - self.window_s
        self.events = [e for e in self.events if e.xid in FATAL_XIDS or e.at >= horizon]

    def faults(self, uuid: str) -> list[GpuFault]:
        found = []
        for event in self.events:
            if event.uuid == uuid:
                meaning = FATAL_XIDS.get(event.xid)
                age = self.clock() - event.at
                found.append(GpuFault(
                    kind=GpuFaultKind.XID, fatal=meaning is not None,
                    detail=f"Xid {event.xid}" + (f" ({meaning})" if meaning else "")
                    + f", {age:.0f}s ago"))
        return found

    def close(self) -> None:
        if self.event_set is not None:
            try:
                self.nvml.nvmlEventSetFree(self.event_set)
            except self.nvml.NVMLError:
                pass
            self.event_set = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
