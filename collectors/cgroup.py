"""CPU %, memory and I/O rates from the worker's cgroup counters (or /proc without cgroups).

Rates are deltas over the wall time between two samples; on the first sample they stay 0.0 and the
record's ``rate_window_s`` is 0.0. A counter that goes backwards (reset, re-adopted worker) yields
0.0 for that tick rather than a negative rate.
"""

from __future__ import annotations

import os

from rbee.plugin import hookimpl

MIB = 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _rate(now: int, before: int, seconds: float) -> float:
    if now < 0 or before < 0 or now < before:
        return 0.0
    return (now - before) / seconds


@hookimpl
def rbee_collect_worker(worker, telemetry) -> None:
    sample = worker.sample
    if sample.memory_rss_bytes >= 0:
        telemetry.rss_mb = round(sample.memory_rss_bytes / MIB, 2)
    elif sample.proc_rss_pages >= 0:
        telemetry.rss_mb = round(sample.proc_rss_pages * PAGE_SIZE / MIB, 2)
    if sample.memory_current_bytes >= 0:
        telemetry.memory_mb = round(sample.memory_current_bytes / MIB, 2)
    else:
        telemetry.memory_mb = telemetry.rss_mb

    previous = worker.previous
    seconds = worker.elapsed_s
    if previous is None or seconds <= 0:
        return
    if sample.cpu_usage_usec >= 0:
        cpu_seconds = _rate(sample.cpu_usage_usec, previous.cpu_usage_usec, seconds) / 1e6
    else:
        cpu_seconds = _rate(sample.proc_cpu_ticks, previous.proc_cpu_ticks, seconds) / CLOCK_TICKS
    telemetry.cpu_pct = round(cpu_seconds * 100, 2)
    telemetry.io_r_mb_s = round(_rate(sample.io_read_bytes, previous.io_read_bytes, seconds) / MIB, 3)
    telemetry.io_w_mb_s = round(
        _rate(sample.io_write_bytes, previous.io_write_bytes, seconds) / MIB, 3
    )
