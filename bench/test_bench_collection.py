"""Collection of 10 and 100 real workers: the Cython path, the pure-Python twin, and psutil on the
same PIDs, in one run. Targets: 10 workers < 1 ms, 100 < 2 ms, Cython sample path >= 3x Python,
and faster than psutil.

``collect_all`` is the whole tick (read, parse, every built-in plugin, WorkerTelemetry records);
``sample_only`` is just the per-worker read-and-parse call, the part the Cython extension replaces.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from rbee import _cstat, _pystat
from rbee.config import CollectorSettings
from rbee.hive.collection import TelemetryCollector
from rbee.hive.sampling import StatSource
from rbee.plugin.manager import build_plugin_manager

from .conftest import record

TWINS = {"cython": _cstat.read_sample, "python": _pystat.read_sample}


@pytest.mark.parametrize("implementation", ["cython", "python"])
def test_collect_all(benchmark, fleet, implementation):
    collector = TelemetryCollector(fleet, build_plugin_manager(), CollectorSettings(gpu="none"),
                                   read_sample=TWINS[implementation])
    collector.collect_all()
    records = benchmark(collector.collect_all)
    assert len(records) == len(fleet.workers())
    record(benchmark, f"collect_all[{len(records)}] {implementation}")


@pytest.mark.parametrize("implementation", ["cython", "python"])
def test_sample_only(benchmark, fleet, implementation):
    read_sample = TWINS[implementation]
    opened = [StatSource(worker.stat_paths, worker.pid) for worker in fleet.workers()]
    sources = [source.args for source in opened]

    def sample_all():
        return [read_sample(*args) for args in sources]

    try:
        samples = benchmark(sample_all)
    finally:
        for source in opened:
            source.close()
    assert all(sample.cpu_usage_usec >= 0 for sample in samples)
    record(benchmark, f"sample_only[{len(samples)}] {implementation}")


def test_psutil_same_pids(benchmark, fleet):
    """The obvious alternative: psutil Process objects kept, the same figures asked for."""
    processes = [psutil.Process(worker.pid) for worker in fleet.workers()]

    def sample_all():
        return [(p.cpu_times(), p.memory_info(), p.io_counters()) for p in processes]

    samples = benchmark(sample_all)
    assert len(samples) == len(processes)
    record(benchmark, f"psutil[{len(samples)}]")


@pytest.mark.parametrize("implementation", ["cython", "python"])
def test_parse_only(benchmark, fleet, implementation):
    """The parsing alone, on bytes already read from the fleet's real files: what the extension
    saves once the kernel's cost of producing the files (the same for both) is set aside."""
    import os

    parser = _cstat if implementation == "cython" else _pystat
    worker = fleet.workers()[0]
    source = StatSource(worker.stat_paths, worker.pid)
    cpu, _, current, memory_stat, _, io, _, _ = source.args
    texts = [os.pread(fd, 32768, 0) for fd in (cpu, current, memory_stat, io)]
    source.close()
    proc_stat = Path(f"/proc/{worker.pid}/stat").read_bytes()
    count = len(fleet.workers())

    def parse_fleet():
        for _ in range(count):
            parser.parse_single(texts[0])
            parser.parse_single(texts[1])
            parser.parse_keyed(texts[2], b"total_rss")
            parser.parse_proc_io(texts[3])
            parser.parse_proc_stat(proc_stat)

    benchmark(parse_fleet)
    record(benchmark, f"parse_only[{count}] {implementation}")
