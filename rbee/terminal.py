"""Renders workers and GPUs as terminal tables (``rbee up``, ``rbee top``, ``rbee workers``).

Every cell goes through ``printable`` in ``_render``, whatever table or column it is in, so text a
hive sent (a model name, an error message, a GPU name) cannot move the cursor, recolour or clear
the operator's terminal: a control character shows as its escape (``\x1b``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from .contract import (
    MIB,
    GpuDevice,
    GpuUtilSource,
    Healthy,
    WorkerExit,
    WorkerState,
    WorkerTelemetry,
    describe_health,
    on_gpu,
    utc_now,
)

COLUMNS = ("HIVE", "GROUP/INSTANCE", "PID", "STATE", "MODEL", "CPU%", "RSS MB", "IO R/W MB/s",
           "GPU%", "VRAM MB", "RUN", "QUEUE", "KV%", "IDLE", "UPTIME", "LAST 60s", "NOTE")
WIDTHS = (14, 22, 8, 10, 14, 7, 8, 14, 6, 13, 5, 6, 5, 4, 8, 14, 0)
"""STATE is the worker's ``WorkerState`` (``running``, ``starting``, ``backoff``, ``crashloop``,
``exited``, ``oom_killed``); NOTE then says its restarts, OOM kills, how it last ended and its
last line of stderr. RUN, QUEUE and KV% are the worker's engine's requests running, requests
waiting and KV-cache use; ``-`` where its engine is unknown (or publishes no KV-cache figure).
IDLE is the queen's judgement, as the stream and ``/v1/workers`` carry it. GPU% and VRAM MB are
``-`` for a worker on no GPU (nothing to measure), ``?`` where the driver gave no figure."""
BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], top: float = 100.0) -> str:
    """One character per value, ``▁`` (0) to ``█`` (``top`` or more); a blank where none."""
    return "".join(" " if v is None else BARS[min(len(BARS) - 1, int(max(v, 0.0) / top * len(BARS)))]
                   for v in values)


def printable(text: str) -> str:
    """``text`` with every character that is not printable (C0 and C1 controls, DEL, bidi
    overrides, line separators) written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def uptime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


class Row(NamedTuple):
    """One worker's row: where it runs, what it reported, and what the queen says of it."""

    hive: str
    worker: WorkerTelemetry
    idle: bool
    note: str = ""
    trend: str = ""
    """Its last minute as a sparkline (LAST 60s)."""


def _cells(row: Row) -> tuple[str, ...]:
    worker = row.worker
    notes = [row.note] if row.note else []
    notes += lifecycle_notes(worker)
    if worker.rate_window_s == 0.0 and worker.state in (WorkerState.RUNNING, WorkerState.STARTING):
        notes.append("first sample")
    if not worker.limits_applied:
        notes.append("limits not enforced")
    notes.extend(f"{e.collector}: {e.message}" for e in worker.errors)
    engine = worker.engine
    cells = (
        row.hive, f"{worker.group}/{worker.instance}", str(worker.pid), worker.state,
        worker.model or "-",
        f"{worker.cpu_pct:.1f}", f"{worker.rss_bytes / MIB if worker.rss_bytes else worker.rss_mb:.1f}",
        f"{worker.io_r_mb_s:.2f}/{worker.io_w_mb_s:.2f}", gpu_util(worker),
        f"{worker.vram_mb:.0f}/{worker.total_vram_mb:.0f}" if on_gpu(worker) else "-",
        str(engine.requests_running) if engine else "-",
        str(engine.requests_waiting) if engine else "-",
        f"{engine.kv_cache_pct:.0f}" if engine and engine.kv_cache_pct is not None else "-",
        "yes" if row.idle else "no", uptime(worker.uptime_s), row.trend, ", ".join(notes),
    )
    return cells


def lifecycle_notes(worker: WorkerTelemetry, now: datetime | None = None) -> list[str]:
    """Restarts, OOM kills, the next attempt, how it last ended and its last stderr line."""
    notes = []
    if worker.next_attempt_at is not None:
        wait = (worker.next_attempt_at - (now or utc_now())).total_seconds()
        notes.append(f"next start in {max(0.0, wait):.0f}s")
    if worker.restarts:
        notes.append(f"{worker.restarts} restarts")
    if worker.oom_kills:
        notes.append(f"{worker.oom_kills} OOM kills")
    ending = worker.last_exit
    if ending is not None:
        notes.append(f"last exit: {describe_exit(ending)} after {ending.ran_s:.0f}s")
        if ending.stderr_tail:
            notes.append(f"stderr: {ending.stderr_tail[-1]}")
    return notes


def describe_exit(ending: WorkerExit) -> str:
    """``OOM-killed``, ``SIGSEGV``, ``status 3`` or ``unknown status``."""
    if ending.oom_killed:
        return "OOM-killed"
    if ending.signal:
        return ending.signal
    return "unknown status" if ending.exit_code is None else f"status {ending.exit_code}"


def gpu_util(worker: WorkerTelemetry) -> str:
    """The worker's GPU %: ``-`` for a worker on no GPU, ``?`` when the driver gives no figure,
    ``~`` after a device-wide figure (per-process figures unsupported: every process on that GPU
    shares it)."""
    if not on_gpu(worker):
        return "-"
    if worker.gpu_util_pct is None:
        return "?"
    mark = "~" if worker.gpu_util_source is GpuUtilSource.DEVICE else ""
    return f"{worker.gpu_util_pct:.0f}{mark}"


def table(rows: Iterable[Row]) -> str:
    return _render(COLUMNS, WIDTHS, [_cells(row) for row in rows])


GPU_COLUMNS = ("HIVE", "GPU", "NAME", "UTIL%", "MEM%", "VRAM USED/TOTAL MB", "TEMP", "POWER W",
               "HEALTH")
GPU_WIDTHS = (14, 8, 28, 6, 5, 19, 5, 8, 0)


def gpu_table(rows: Iterable[tuple[str, GpuDevice]]) -> str:
    """The hives' GPUs: a MIG instance shows as ``<gpu>/mig<id>``; health with its reasons."""
    return _render(GPU_COLUMNS, GPU_WIDTHS, [_gpu_cells(hive, device) for hive, device in rows])


def _gpu_cells(hive: str, device: GpuDevice) -> tuple[str, ...]:
    where = (f"{device.index}/mig{device.mig_instance_id}" if device.mig_parent_uuid
             else str(device.index))
    state, _, reason = describe_health(device.health).partition(": ")
    health = "ok" if isinstance(device.health, Healthy) else f"{state.upper()}: {reason}"
    return (hive, where, device.name, _figure(device.util_pct), _figure(device.mem_util_pct),
            f"{device.vram_used_mb:.0f}/{device.vram_total_mb:.0f}",
            _figure(device.temperature_c), _figure(device.power_w), health)


def _figure(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _render(columns: tuple[str, ...], widths: tuple[int, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(printable(cell)[: w or None].ljust(w)
                        for cell, w in zip(cells, widths, strict=True))
              for cells in rows]
    return "\n".join(line.rstrip() for line in lines)
