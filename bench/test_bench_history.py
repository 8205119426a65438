"""History recording at fleet scale: 10,000 eight-GPU hives of eight vLLM workers (112 series
each, 1.12 M series), the heartbeat of ``tests/fleetload.py``.

- ``step``: one recording step (what the queen's history task does each second) when every hive
  sent a heartbeat since the last one, for this tree's columnar history and for the Python loop
  per series it replaced ("before": ``rbee/queen/history.py`` of ``RBEE_BENCH_BEFORE``, a tree,
  or of revision ``BEFORE_REVISION`` by default). The before side runs ``BEFORE_HIVES`` hives and
  is scaled per series (its cost is a loop over series: linear), since 1.12 M of its series would
  take over 2 GB. Both use short tiers (20 s fine, 100 s coarse) so that 1.12 M series fit this
  machine: a step writes one column whatever the retention, and a 10 s bucket closes from its 10
  fine points either way. Printed: CPU ms per step (thread time: what the step costs whatever
  else runs on the machine), % of one core at 1 Hz, the ratio, the longest part between two
  checkpoints (how long the queen's event loop is held); then a query over the whole fleet (refused
  past ``max_series_per_query``) and one of a single hive.
- ``memory``: bytes per series at the default tiers, and the RSS the default history
  (``max_bytes`` 256 MiB) takes at 10,000 hives once its rings have wrapped, against the before
  side's RSS per series.

``RBEE_BENCH_HISTORY_HIVES`` changes the fleet (10,000 by default).
"""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from rbee.config import HistorySettings
from rbee.contract import HiveHeartbeat, HiveRecord
from rbee.queen.history import FleetHistory, QueryError, Selector
from tests.fleetload import eight_gpu_heartbeat

from .conftest import FIGURES

HIVES = int(os.environ.get("RBEE_BENCH_HISTORY_HIVES", "10000"))
BEFORE_HIVES = 1000
BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
BEFORE_REVISION = "9cc625a"
"""The last commit with the Python loop per series."""
REPO = Path(__file__).parents[1]
SHORT = dict(fine_retention_s=20.0, coarse_retention_s=100.0)
T0 = 1_800_000_000.0
SERIES_PER_HIVE = 8 * 9 + 8 * 5


def fleet(count: int) -> list[HiveRecord]:
    """``count`` hives as the registry holds them (64 distinct heartbeats, each hive its own
    decoded structs)."""
    bodies = [eight_gpu_heartbeat("hive-00000", seed) for seed in range(64)]
    records = []
    for index in range(count):
        body = bodies[index % 64].replace(b'"hive-00000"', f'"hive-{index:05d}"'.encode())
        beat = msgspec.json.decode(body, type=HiveHeartbeat)
        records.append(HiveRecord(info=beat.hive, workers=beat.workers, gpus=beat.capabilities))
    return records


def beaten(records: list[HiveRecord]) -> list[HiveRecord]:
    """The same fleet after a heartbeat from every hive: new lists in the registry."""
    return [HiveRecord(info=r.info, workers=list(r.workers), gpus=list(r.gpus)) for r in records]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def before_module() -> types.ModuleType:
    """The Python-loop history as a module of its own (its relative imports made absolute)."""
    if BEFORE:
        source = Path(BEFORE, "rbee", "queen", "history.py").read_text()
    else:
        source = subprocess.run(["git", "show", f"{BEFORE_REVISION}:rbee/queen/history.py"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    source = source.replace("from ..config", "from rbee.config").replace(
        "from ..contract", "from rbee.contract")
    module = types.ModuleType("rbee_history_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "before/rbee/queen/history.py", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def records():
    return fleet(HIVES)


def test_step(benchmark, records):
    history = FleetHistory(HistorySettings(max_bytes=2**31, **SHORT))
    started = time.perf_counter()
    history.record(records, T0)
    first_s = time.perf_counter() - started
    assert len(history) == HIVES * SERIES_PER_HIVE and history.refused == 0
    clock = iter(range(1, 10**6))
    parts: list[float] = []
    cpu: list[float] = []

    last: list[list[HiveRecord]] = []

    def step(fleet: list[HiveRecord]) -> None:
        started = mark = time.thread_time()
        for _ in history.recording(fleet, T0 + next(clock)):
            parts.append(time.thread_time() - mark)
            mark = time.thread_time()
        parts.append(time.thread_time() - mark)
        cpu.append(time.thread_time() - started)
        last[:] = [fleet]

    def setup() -> tuple[tuple, dict]:
        fleet = beaten(records)
        gc.collect()  # the collector's pass over the fleet made here is not the step's
        return (fleet,), {}

    benchmark.pedantic(step, setup=setup, rounds=20)
    new_s = statistics.median(cpu)
    closing_s = max(cpu)  # the round where a 10 s bucket closed
    started = time.thread_time()
    history.record(last[0], T0 + next(clock))  # nothing new since the last step
    quiet_s = time.thread_time() - started

    started = time.thread_time()
    with pytest.raises(QueryError):  # the dashboard's sparklines, over 80,000 workers
        history.query(Selector(metrics=frozenset({"cpu_pct", "gpu_util_pct"})), 60, 5,
                      T0 + next(clock))
    refused_s = time.thread_time() - started
    started = time.thread_time()
    one = history.query(Selector(hive="hive-00042"), 20, None, T0 + next(clock))
    one_s = time.thread_time() - started
    assert len(one.series) == SERIES_PER_HIVE

    old = before_module()
    small = records[:BEFORE_HIVES]
    before = old.FleetHistory(SimpleNamespace(fine_step_s=1.0, coarse_step_s=10.0,
                                              max_series=10**8, max_series_per_query=5000,
                                              **SHORT))
    rss = rss_bytes()
    before.record(small, T0)
    before_bytes = (rss_bytes() - rss) / len(before)
    timings = []
    for second in range(1, 4):
        fresh = beaten(small)
        started = time.thread_time()
        before.record(fresh, T0 + second)
        timings.append(time.thread_time() - started)
    before_s = statistics.median(timings) * HIVES / BEFORE_HIVES

    series = HIVES * SERIES_PER_HIVE
    FIGURES[f"history step, {HIVES:,} hives ({series / 1e6:.2f} M series), CPU"] = (
        f"{new_s * 1e3:.1f} ms = {new_s * 100:.1f} % of a core at 1 Hz ({closing_s * 1e3:.0f} ms "
        f"when a 10 s bucket closes); before (Python loop per series, {BEFORE_HIVES:,} hives "
        f"scaled): {before_s * 1e3:,.0f} ms = {before_s * 100:.0f} %; {before_s / new_s:.0f}x "
        f"less")
    FIGURES["history step, longest part between checkpoints, CPU"] = f"{max(parts) * 1e3:.1f} ms"
    FIGURES["history step, no heartbeat since the last, CPU"] = f"{quiet_s * 1e3:.1f} ms"
    FIGURES["history query over the whole fleet (refused), CPU"] = f"{refused_s * 1e3:.1f} ms"
    FIGURES["history query of one hive (112 series), CPU"] = f"{one_s * 1e3:.1f} ms"
    FIGURES["history first step (rows handed out)"] = f"{first_s * 1e3:.0f} ms"
    FIGURES["history before: RSS per series"] = f"{before_bytes:,.0f} bytes (short tiers)"
    assert before_s / new_s >= 5


def test_memory(benchmark, records):
    """RSS of the default history at the whole fleet, every ring wrapped (each block written
    through, as 6 hours of steps would), and how much of the fleet it holds."""
    rss = rss_bytes()
    history = FleetHistory()
    benchmark.pedantic(history.record, args=(records, T0), rounds=1)
    fleet = beaten(records)
    started = time.thread_time()
    history.record(fleet, T0 + 1)  # the hives refused whole are not gathered
    step_s = time.thread_time() - started
    for store in (history.values, history.plugins):
        for tier in (store.fine, store.coarse):
            for block in tier.blocks:
                block[...] = 1  # touched through: resident, as wrapped rings are
    grown = rss_bytes() - rss
    settings = history.settings
    recorded = len(history) // SERIES_PER_HIVE
    FIGURES["history bytes per series (default tiers)"] = (
        f"{history.values.row_bytes:,} (900 fine + 2,160 coarse float16 points, current, flag)")
    FIGURES[f"history RSS at {HIVES:,} hives, default max_bytes"] = (
        f"{grown / 2**20:.0f} MiB for a budget of {settings.max_bytes / 2**20:.0f} MiB: "
        f"{recorded:,} hives recorded ({len(history):,} series), {history.refused:,} series "
        f"refused; a step costs {step_s * 1e3:.1f} ms CPU")
    assert history.budget.used <= settings.max_bytes
    assert grown <= settings.max_bytes * 1.25  # blocks round up; bookkeeping per hive is small
