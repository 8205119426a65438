"""The worker table's columns, shared by ``rbee workers``, the plain ``rbee top`` and its
interactive view: what each column shows, how wide it is, which go first on a narrow terminal,
how it sorts and when its figure is a warning.

One list of ``Column`` for every view, so a column added here is in all of them, and ``fit``
decides for all of them what a terminal of a given width shows: columns are dropped by priority
(the highest number first) until the rest fit, never wrapped; the last column (NOTE) takes what
is left.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .contract import (
    METRIC_KEY_CHARS,
    METRIC_KEY_PATTERN,
    MIB,
    GpuUtilSource,
    WorkerState,
    WorkerTelemetry,
    cut,
    on_gpu,
)

GAP = 2
"""Spaces between two columns of the plain table."""
NOTE_MIN = 12
"""The narrowest NOTE worth showing; below it the column is dropped."""


class Row(NamedTuple):
    """One worker's row: where it runs, what it reported, and what the queen says of it."""

    hive: str
    worker: WorkerTelemetry
    idle: bool
    note: str = ""
    trend: str = ""
    """Its last minute as a sparkline (LAST 60s)."""
    stale: bool = False
    """Its hive went silent: every figure in the row is its last known one."""
    hive_level: int = 0
    """Its hive's health: ``WARN`` degraded, ``BAD`` unhealthy."""


OK, WARN, BAD = 0, 1, 2
"""A cell's level, which the interactive view colours (default, yellow, red)."""


class Column(NamedTuple):
    """One column. ``width`` 0: the rest of the line (only the last column)."""

    title: str
    width: int
    priority: int
    """0 is always shown; on a narrow terminal the highest numbers go first."""
    cell: Callable[[Row], str]
    sort: Callable[[Row], float | str] | None = None
    """The sort key; None: not a sort column. Figures sort largest first."""
    gauge: Callable[[Row], float | None] | None = None
    """How full (0 to 1) the figure is, for a bar in the interactive view; None: no bar."""
    level: Callable[[Row], int] = lambda row: OK
    numeric: bool = False


def _figure(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


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


def _kv(row: Row) -> float | None:
    engine = row.worker.engine
    return None if engine is None else engine.kv_cache_pct


def _waiting(row: Row) -> float | None:
    engine = row.worker.engine
    return None if engine is None else engine.requests_waiting


def _vram_share(row: Row) -> float | None:
    w = row.worker
    return w.vram_mb / w.total_vram_mb if on_gpu(w) and w.total_vram_mb else None


def _pct(value: float | None) -> float | None:
    return None if value is None else value / 100.0


def level_of(value: float | None, warn: float, bad: float) -> int:
    """WARN at or past ``warn``, BAD at or past ``bad``: a saturated GPU, KV cache or queue."""
    if value is None:
        return OK
    return BAD if value >= bad else WARN if value >= warn else OK


def _state_level(row: Row) -> int:
    state = row.worker.state
    if state in (WorkerState.CRASHLOOP, WorkerState.OOM_KILLED, WorkerState.EXITED):
        return BAD
    return WARN if state in (WorkerState.BACKOFF, WorkerState.STARTING) or row.stale else OK


def _number(value: float | None) -> float:
    """Sort key of a figure: unknown sorts after every known one (largest first)."""
    return float("-inf") if value is None else float(value)


def _rss(row: Row) -> float:
    w = row.worker
    return w.rss_bytes / MIB if w.rss_bytes else w.rss_mb


def _uptime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def _engine_count(field: str) -> Callable[[Row], str]:
    def cell(row: Row) -> str:
        engine = row.worker.engine
        return "-" if engine is None else str(getattr(engine, field))
    return cell


def _engine_key(field: str) -> Callable[[Row], float]:
    return lambda row: _number(getattr(row.worker.engine, field, None))


def worker_columns(notes: Callable[[Row], str]) -> tuple[Column, ...]:
    """Every built-in column, in display order; ``notes`` writes a row's NOTE."""
    return (
        Column("HIVE", 14, 0, lambda r: r.hive, lambda r: r.hive,
               level=lambda r: max(r.hive_level, WARN if r.stale else OK)),
        Column("GROUP/INSTANCE", 22, 0, lambda r: f"{r.worker.group}/{r.worker.instance}",
               lambda r: f"{r.worker.group}/{r.worker.instance}"),
        Column("PID", 8, 9, lambda r: str(r.worker.pid), lambda r: r.worker.pid, numeric=True),
        Column("STATE", 10, 2, lambda r: str(r.worker.state), lambda r: str(r.worker.state),
               level=_state_level),
        Column("MODEL", 14, 1, lambda r: r.worker.model or "-", lambda r: r.worker.model or ""),
        Column("CPU%", 7, 4, lambda r: f"{r.worker.cpu_pct:.1f}", lambda r: r.worker.cpu_pct,
               numeric=True),
        Column("RSS MB", 8, 6, lambda r: f"{_rss(r):.1f}", _rss, numeric=True),
        Column("IO R/W MB/s", 14, 8, lambda r: f"{r.worker.io_r_mb_s:.2f}/{r.worker.io_w_mb_s:.2f}",
               lambda r: r.worker.io_r_mb_s + r.worker.io_w_mb_s, numeric=True),
        Column("GPU%", 6, 1, lambda r: gpu_util(r.worker), lambda r: _number(r.worker.gpu_util_pct),
               gauge=lambda r: _pct(r.worker.gpu_util_pct) if on_gpu(r.worker) else None,
               level=lambda r: level_of(r.worker.gpu_util_pct, 80, 95), numeric=True),
        Column("VRAM MB", 13, 3,
               lambda r: f"{r.worker.vram_mb:.0f}/{r.worker.total_vram_mb:.0f}"
               if on_gpu(r.worker) else "-",
               lambda r: _number(r.worker.vram_mb if on_gpu(r.worker) else None),
               gauge=_vram_share, level=lambda r: level_of(_vram_share(r), 0.9, 0.97), numeric=True),
        Column("RUN", 5, 5, _engine_count("requests_running"), _engine_key("requests_running"),
               numeric=True),
        Column("QUEUE", 6, 3, _engine_count("requests_waiting"), _engine_key("requests_waiting"),
               level=lambda r: level_of(_waiting(r), 1, 10), numeric=True),
        Column("KV%", 5, 2, lambda r: _figure(_kv(r)), lambda r: _number(_kv(r)),
               gauge=lambda r: _pct(_kv(r)), level=lambda r: level_of(_kv(r), 80, 95), numeric=True),
        Column("IDLE", 4, 2, lambda r: "yes" if r.idle else "no", lambda r: not r.idle),
        Column("UPTIME", 8, 7, lambda r: _uptime(r.worker.uptime_s), lambda r: r.worker.uptime_s,
               numeric=True),
        Column("LAST 60s", 14, 6, lambda r: r.trend),
        Column("NOTE", 0, 5, notes),
    )


def metric_column(key: str) -> Column:
    """A plugin's figure (``WorkerTelemetry.metrics[key]``), shown on request (``--columns``);
    ``-`` where the worker's hive reports none."""
    def value(row: Row) -> float | None:
        return row.worker.metrics.get(key)
    return Column(key, max(len(key), 8), 3, lambda r: _figure(value(r), ".4g"),
                  lambda r: _number(value(r)), numeric=True)


def with_metrics(columns: Sequence[Column], keys: Sequence[str]) -> tuple[Column, ...]:
    """``columns`` with a column for each plugin metric in ``keys``, before NOTE."""
    *first, last = columns
    return (*first, *(metric_column(key) for key in keys), last)


def parse_keys(text: str | None) -> list[str]:
    """``--columns a.b,c.d`` as keys, in order, without blanks or repeats; a ``ValueError``
    naming a key that no plugin can report (not a metric key of the contract)."""
    keys = list(dict.fromkeys(k.strip() for k in (text or "").split(",") if k.strip()))
    for key in keys:
        if len(key) > METRIC_KEY_CHARS or not re.match(METRIC_KEY_PATTERN, key):
            raise ValueError(f"--columns: {key!r} is no plugin metric key (at most "
                             f"{METRIC_KEY_CHARS} letters, digits and _ . : -, e.g. ctxsw.procs)")
    return keys


def fit(columns: Sequence[Column], width: int | None, gap: int = GAP) -> list[tuple[Column, int]]:
    """The columns a line of ``width`` characters shows, in display order, each with its width;
    ``width`` None: all of them, the last unbounded (0). Columns go by priority, highest first;
    those of priority 0 stay whatever the width (the caller cuts the line)."""
    if width is None:
        return [(column, column.width) for column in columns]
    kept: set[int] = set()
    used = 0
    for i in sorted(range(len(columns)), key=lambda i: (columns[i].priority, i)):
        need = (columns[i].width or NOTE_MIN) + (gap if kept else 0)
        if used + need > width and columns[i].priority > 0:
            break  # and every column after it: a wider terminal never shows fewer
        kept.add(i)
        used += need
    shown = [(columns[i], columns[i].width) for i in sorted(kept)]
    if shown and shown[-1][1] == 0:  # the last column takes the rest
        shown[-1] = (shown[-1][0], max(1, width - used + NOTE_MIN))
    return shown


def clip(text: str, width: int) -> str:
    """``text`` in ``width`` characters (0: as it is), an ellipsis where it was cut."""
    return cut(text, width) if width else text
