"""Renders workers as the rows of a terminal table (``rbee up``, ``rbee top``)."""

from __future__ import annotations

from collections.abc import Iterable

from .telemetry import WorkerTelemetry

COLUMNS = ("HIVE", "GROUP/INSTANCE", "PID", "MODEL", "CPU%", "RSS MB", "IO R/W MB/s", "GPU%",
           "VRAM MB", "RUN", "QUEUE", "KV%", "UPTIME", "NOTE")
WIDTHS = (14, 22, 8, 14, 7, 8, 14, 6, 13, 5, 6, 5, 8, 0)
"""RUN, QUEUE and KV% are the worker's engine's requests running, requests waiting and KV-cache
use; ``-`` where its engine is unknown (or publishes no KV-cache figure)."""


def uptime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def row(hive: str, worker: WorkerTelemetry, note: str = "") -> str:
    notes = [note] if note else []
    if worker.rate_window_s == 0.0:
        notes.append("first sample")
    if not worker.limits_applied:
        notes.append("limits not enforced")
    notes.extend(f"{e.collector}: {e.message}" for e in worker.errors)
    engine = worker.engine
    cells = (
        hive, f"{worker.group}/{worker.instance}", str(worker.pid), worker.model or "-",
        f"{worker.cpu_pct:.1f}", f"{worker.rss_mb:.1f}",
        f"{worker.io_r_mb_s:.2f}/{worker.io_w_mb_s:.2f}", f"{worker.gpu_util_pct:.0f}",
        f"{worker.vram_mb:.0f}/{worker.total_vram_mb:.0f}",
        str(engine.requests_running) if engine else "-",
        str(engine.requests_waiting) if engine else "-",
        f"{engine.kv_cache_pct:.0f}" if engine and engine.kv_cache_pct is not None else "-",
        uptime(worker.uptime_s), ", ".join(notes),
    )
    return "  ".join(cell[: w or None].ljust(w) for cell, w in zip(cells, WIDTHS, strict=True))


def table(rows: Iterable[tuple[str, WorkerTelemetry, str]]) -> str:
    header = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, WIDTHS, strict=True))
    lines = [header] + [row(hive, worker, note) for hive, worker, note in rows]
    return "\n".join(line.rstrip() for line in lines)
