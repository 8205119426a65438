"""Renders workers and GPUs as terminal tables (``rbee up``, ``rbee top``, ``rbee workers``).

Every cell goes through ``printable`` in ``_render``, whatever table or column it is in, so text a
hive sent (a model name, an error message, a GPU name) cannot move the cursor, recolour or clear
the operator's terminal: a control character shows as its escape (``\x1b``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from .columns import Column, Row, clip, fit, gpu_util, worker_columns
from .contract import (
    GpuDevice,
    Healthy,
    WorkerExit,
    WorkerState,
    WorkerTelemetry,
    describe_health,
    utc_now,
)

__all__ = ["Row", "count", "gpu_table", "gpu_util", "lifecycle_notes", "printable", "sparkline",
           "table"]

WORKER_COLUMNS = worker_columns(lambda row: ", ".join(row_notes(row)))
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


def row_notes(row: Row) -> list[str]:
    """What NOTE says of a row: the hive's state, the worker's lifecycle, its collectors' errors."""
    worker = row.worker
    notes = [row.note] if row.note else []
    notes += lifecycle_notes(worker)
    if worker.rate_window_s == 0.0 and worker.state in (WorkerState.RUNNING, WorkerState.STARTING):
        notes.append("first sample")
    if not worker.limits_applied:
        notes.append("limits not enforced")
    notes.extend(f"{e.collector}: {e.message}" for e in worker.errors)
    return notes


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


def table(rows: Iterable[Row], width: int | None = None,
          columns: Sequence[Column] = WORKER_COLUMNS) -> str:
    """The workers as a table ``width`` characters wide at most (None: each column its own
    width, nothing dropped): on a narrow terminal ``fit`` drops columns, never wraps a row."""
    shown = fit(columns, width)
    text = _render(tuple(c.title for c, _ in shown), tuple(w for _, w in shown),
                   [tuple(c.cell(row) for c, _ in shown) for row in rows])
    return text if width is None else _cut_lines(text, width)


def _cut_lines(text: str, width: int) -> str:
    """Every line of ``text`` in ``width`` characters: the terminal never wraps one."""
    return "\n".join(clip(line, width) for line in text.splitlines())


def count(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``, ``0 workers``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


GPU_COLUMNS = ("HIVE", "GPU", "NAME", "UTIL%", "MEM%", "VRAM USED/TOTAL MB", "TEMP", "POWER W",
               "HEALTH")
GPU_WIDTHS = (14, 8, 28, 6, 5, 19, 5, 8, 0)


def gpu_table(rows: Iterable[tuple[str, GpuDevice]], width: int | None = None) -> str:
    """The hives' GPUs: a MIG instance shows as ``<gpu>/mig<id>``; health with its reasons.
    Each line cut at ``width`` (None: not cut)."""
    text = _render(GPU_COLUMNS, GPU_WIDTHS, [_gpu_cells(hive, device) for hive, device in rows])
    return text if width is None else _cut_lines(text, width)


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
    lines += ["  ".join(clip(printable(cell), w).ljust(w)
                        for cell, w in zip(cells, widths, strict=True))
              for cells in rows]
    return "\n".join(line.rstrip() for line in lines)
