"""Benchmark fixtures: N real sleeping workers, each in its own cgroup on this machine, and a
summary at the end that prints each benchmark's median and the ratios asked for in the targets."""

from __future__ import annotations

import os

import pytest

from rbee.hive.cgroups import select_backend
from rbee.hive.processes import ProcessMonitor

MEDIANS: dict[str, float] = {}
FIGURES: dict[str, str] = {}
"""Figures that are not a median time (rates, latency percentiles), printed as they are."""


@pytest.fixture(scope="module", params=[10, 100], ids=lambda n: f"{n}-workers")
def fleet(request):
    """A ProcessMonitor with N sleeping workers in real cgroups (the best backend here)."""
    count = request.param
    backend = select_backend("auto", f"rbee-bench-{os.getpid()}-{count}")
    monitor = ProcessMonitor(backend)
    try:
        for index in range(count):
            monitor.spawn("bench", f"w{index:03}", ["sleep", "600"])
        yield monitor
    finally:
        monitor.stop_all(grace=1.0)
        backend.remove_root()


def record(benchmark, name: str) -> None:
    MEDIANS[name] = benchmark.stats.stats.median


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    if FIGURES:
        write("")
        write("rbee queen figures")
        for name, figure in FIGURES.items():
            write(f"  {name}: {figure}")
    if not MEDIANS:
        return
    write("")
    write("rbee benchmark summary (medians)")
    for name, seconds in sorted(MEDIANS.items()):
        write(f"  {name:<40} {seconds * 1e3:8.3f} ms")
    ratios = [  # (what, slower benchmark, faster benchmark)
        ("collect_all python/cython", "collect_all[{n}] python", "collect_all[{n}] cython"),
        ("sample path python/cython", "sample_only[{n}] python", "sample_only[{n}] cython"),
        ("parsing alone python/cython", "parse_only[{n}] python", "parse_only[{n}] cython"),
        ("psutil/cython collect_all", "psutil[{n}]", "collect_all[{n}] cython"),
    ]
    for count in (10, 100):
        for what, slower, faster in ratios:
            numerator = MEDIANS.get(slower.format(n=count))
            denominator = MEDIANS.get(faster.format(n=count))
            if numerator and denominator:
                write(f"  {count} workers: {what} = {numerator / denominator:.2f}x")
