"""Benchmark fixtures: N real sleeping workers, each in its own cgroup on this machine, and a
summary at the end that prints each benchmark's median and the ratios asked for in the targets."""

from __future__ import annotations

import os

import pytest

from rbee.hive.cgroups import select_backend
from rbee.hive.monitor import ProcessMonitor

MEDIANS: dict[str, float] = {}


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
    if not MEDIANS:
        return
    write = terminalreporter.write_line
    write("")
    write("rbee benchmark summary (medians)")
    for name, seconds in sorted(MEDIANS.items()):
        write(f"  {name:<40} {seconds * 1e3:8.3f} ms")
    for count in (10, 100):
        cython = MEDIANS.get(f"collect_all[{count}] cython")
        python = MEDIANS.get(f"collect_all[{count}] python")
        psutil_time = MEDIANS.get(f"psutil[{count}]")
        sample_c = MEDIANS.get(f"sample_only[{count}] cython")
        sample_py = MEDIANS.get(f"sample_only[{count}] python")
        if cython and python:
            write(f"  {count} workers: collect_all python/cython = {python / cython:.2f}x")
        if sample_c and sample_py:
            write(f"  {count} workers: sample path python/cython = {sample_py / sample_c:.2f}x")
        parse_c = MEDIANS.get(f"parse_only[{count}] cython")
        parse_py = MEDIANS.get(f"parse_only[{count}] python")
        if parse_c and parse_py:
            write(f"  {count} workers: parsing alone python/cython = {parse_py / parse_c:.2f}x")
        if cython and psutil_time:
            write(f"  {count} workers: psutil/cython collect_all = {psutil_time / cython:.2f}x")
