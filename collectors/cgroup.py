"""CPU %, memory and I/O rates from the worker's cgroup counters (or /proc without cgroups).

Rates are deltas over the wall time between this sample and the hive's reference sample, at least
``collect.rate_window_s`` older (``rbee.hive.rates``: shorter windows read far above a CPU quota);
until the worker has one they stay 0.0 and the record's ``rate_window_s`` is 0.0. A counter that
goes backwards (reset, re-adopted worker) yields 0.0 for that tick rather than a negative rate.
"""

from __future__ import annotations

import os

from rbee.plugin import hookimpl

MIB = 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _delta(now: int, before: int) -> int:
    """Counter increase; 0 for an unreadable counter or one that went backwards (reset)."""
    return now - before if now >= before >= 0 else 0


def _hundredths(value: float) -> float:
    """Two decimals, as on the wire: shorter JSON, and no false precision. (round() is ~3x slower
    and this runs for every figure of every worker every tick.)"""
    return int(value * 100 + 0.5) / 100


@hookimpl
def rbee_collect_worker(worker, telemetry) -> None:
    sample = worker.sample
    rss_bytes = (sample.memory_rss_bytes if sample.memory_rss_bytes >= 0
                 else sample.proc_rss_pages * PAGE_SIZE if sample.proc_rss_pages >= 0 else -1)
    if rss_bytes >= 0:  # the original's u64 MiB, and the byte figure beside it
        telemetry.rss_bytes = rss_bytes
        telemetry.rss_mb = (rss_bytes + MIB // 2) // MIB
    if sample.memory_current_bytes >= 0:
        telemetry.memory_mb = _hundredths(sample.memory_current_bytes / MIB)
    else:
        telemetry.memory_mb = _hundredths(max(rss_bytes, 0) / MIB)

    previous = worker.previous
    seconds = worker.elapsed_s
    if previous is None or seconds <= 0:
        return
    if sample.cpu_usage_usec >= 0:
        cpu_seconds = _delta(sample.cpu_usage_usec, previous.cpu_usage_usec) / 1e6
    else:
        cpu_seconds = _delta(sample.proc_cpu_ticks, previous.proc_cpu_ticks) / CLOCK_TICKS
    telemetry.cpu_pct = _hundredths(cpu_seconds * 100 / seconds)
    per_second = 1 / (MIB * seconds)
    telemetry.io_r_mb_s = _hundredths(_delta(sample.io_read_bytes, previous.io_read_bytes)
                                      * per_second)
    telemetry.io_w_mb_s = _hundredths(_delta(sample.io_write_bytes, previous.io_write_bytes)
                                      * per_second)
