"""History recording at fleet scale: 10,000 eight-GPU hives of eight vLLM workers, the heartbeat
of ``tests/fleetload.py``, against main's history in the same run::

    ./dev bench -k history          (RBEE_BENCH_HISTORY_HIVES=2000 for a quick look)

"main" is ``rbee/queen/history/`` of revision ``BEFORE_REVISION`` (``git archive``), or of the
tree ``RBEE_BENCH_BEFORE``, imported beside this tree's. Every round decodes a fresh heartbeat
for every hive (new structs, as ingest makes them) into a real ``HiveRegistry``; CPU is thread
time (what the work costs whatever else runs on the machine); the cyclic collector runs with the
queen's thresholds.

- ``step``: this tree's history observes the registry (``hive_changed``: the cost it adds to
  each heartbeat is timed on its own); one step records the hives noted since the last. main's
  step reads ``registry.records()`` and records from it, as its queen does. Both with every
  figure of every worker and GPU at 1 s (112 series a hive, 1.12 M at 10,000 hives; short
  tiers, 20 s fine and 100 s coarse, so main's fits: a step writes one column whatever the
  retention), then this tree at its defaults (6 series a worker, a step every 5 s). Printed:
  CPU per step, % of a core, the ratio, the longest part between two checkpoints (how long
  the queen's event loop is held), a step with a coarse close.
- ``memory``: the default history at 10,000 hives, rings written through (resident, as after
  6 hours): the hives it holds and its RSS, against main's default.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from rbee.config import HistorySettings
from rbee.contract import HiveHeartbeat
from rbee.queen.history import FleetHistory, QueryError, Selector
from rbee.queen.history.figures import GPU_METRICS, WORKER_METRICS
from rbee.queen.main import GC_THRESHOLDS
from rbee.queen.registry import HiveRegistry
from tests.fleetload import eight_gpu_heartbeat

from .conftest import FIGURES

HIVES = int(os.environ.get("RBEE_BENCH_HISTORY_HIVES", "10000"))
BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
BEFORE_REVISION = "a8682ec"
"""main when this benchmark was written: the columnar history reading the registry's records."""
REPO = Path(__file__).parents[1]
T0 = 1_800_000_000.0  # a whole multiple of 300: buckets close where the rounds expect
EVERY_FIGURE = dict(fine_step_s=1.0, fine_retention_s=20.0, coarse_step_s=10.0,
                    coarse_retention_s=100.0, max_bytes=2**31,
                    worker_metrics=list(WORKER_METRICS), gpu_metrics=list(GPU_METRICS))
MAIN_DEFAULTS = dict(fine_step_s=1.0, fine_retention_s=900.0, coarse_step_s=10.0,
                     coarse_retention_s=21600.0, max_bytes=256 * 2**20)
ROUNDS = 8


@pytest.fixture(scope="module", autouse=True)
def queen_gc():
    """The cyclic collector as the queen runs it (``rbee/queen/main.py``)."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    yield
    gc.set_threshold(*before)


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    """Each hive's heartbeat (64 distinct ones, each under its hive's id)."""
    base = [eight_gpu_heartbeat("hive-00000", seed) for seed in range(64)]
    return [base[i % 64].replace(b'"hive-00000"', f'"hive-{i:05d}"'.encode())
            for i in range(HIVES)]


@pytest.fixture(scope="module")
def main_history():
    """main's ``FleetHistory`` class, from its own copy of ``rbee/queen/history/``."""
    folder = Path(tempfile.mkdtemp(prefix="rbee-bench-history-"))
    package = folder / "rbee_history_main"
    if BEFORE:
        source = Path(BEFORE, "rbee", "queen", "history")
        files = {p.name: p.read_text() for p in source.glob("*.py")}
    else:
        archive = subprocess.run(["git", "archive", BEFORE_REVISION, "rbee/queen/history"],
                                 cwd=REPO, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            files = {Path(m.name).name: tar.extractfile(m).read().decode()
                     for m in tar.getmembers() if m.name.endswith(".py")}
    package.mkdir()
    for name, text in files.items():
        text = text.replace("from ...config", "from rbee.config").replace(
            "from ...contract", "from rbee.contract")
        (package / name).write_text(text)
    sys.path.insert(0, str(folder))
    try:
        import rbee_history_main
        yield rbee_history_main.FleetHistory
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("rbee_history_main", None)
        for path in sorted(package.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        package.rmdir()
        folder.rmdir()


def beat_all(registry: HiveRegistry, bodies: list[bytes]) -> None:
    """A heartbeat from every hive, decoded fresh, into the registry."""
    decode = msgspec.json.Decoder(HiveHeartbeat).decode
    for body in bodies:
        registry.update_hive(decode(body), admit=False)


def timed_parts(parts) -> tuple[float, float]:
    """CPU of a step given as parts, and its longest part."""
    longest, started = 0.0, time.thread_time()
    mark = started
    for _ in parts:
        now = time.thread_time()
        longest, mark = max(longest, now - mark), now
    now = time.thread_time()
    return now - started, max(longest, now - mark)


def steps(registry: HiveRegistry, bodies: list[bytes], record,
          times: list[tuple[float, bool]]) -> tuple[list[float], float]:
    """CPU of the step at each of ``times`` marked True, a heartbeat of every hive before it
    (those marked False are steps with nothing new, as between two heartbeats of a real
    fleet: they count only for the longest part), and the longest part of all."""
    cpu, longest = [], 0.0
    for now, beaten in times:
        if beaten:
            beat_all(registry, bodies)
            gc.collect()  # the collector's pass over the fresh structs is not the step's
        spent, part = timed_parts(record(now))
        if beaten:
            cpu.append(spent)
        longest = max(longest, part)
    return cpu, longest


def test_step(benchmark, bodies, main_history):
    series = HIVES * (8 * 9 + 8 * 5)
    registry = HiveRegistry()
    history = FleetHistory(HistorySettings(**EVERY_FIGURE))
    registry.observe(history.hive_changed)
    beat_all(registry, bodies)
    started = time.thread_time()
    for _ in history.recording(T0):
        pass
    first_s = time.thread_time() - started
    assert len(history) == series and history.refused == 0

    entries = [(r.info.id, SimpleNamespace(workers=r.workers, capabilities=r.gpus, stale=False))
               for r in registry.records()]  # what the registry hands its observers
    started = time.thread_time()
    for hive_id, entry in entries:
        history.hive_changed(hive_id, entry)
    ingest_s = (time.thread_time() - started) / len(entries)

    times = [(T0 + second, second < ROUNDS or second == 10) for second in range(1, 11)]
    ours, ours_part = steps(registry, bodies, history.recording, times)
    benchmark.pedantic(lambda: None, rounds=1)

    started = time.thread_time()
    with pytest.raises(QueryError):  # the dashboard's sparklines, over 80,000 workers
        history.query(Selector(metrics=frozenset({"cpu_pct", "gpu_util_pct"})), 10, 5, T0 + 11)
    refused_s = time.thread_time() - started
    started = time.thread_time()
    one = history.query(Selector(hive="hive-00042"), 20, None, T0 + 11)
    one_s = time.thread_time() - started
    assert len(one.series) == 112
    del history, one
    registry = HiveRegistry()  # main's history reads the registry: nothing observes it
    gc.collect()

    before = main_history(HistorySettings(**EVERY_FIGURE))
    beat_all(registry, bodies)
    before.record(registry.records(), T0)
    records_cpu: list[float] = []

    def main_step(now: float, history=before):
        started = time.thread_time()
        records = registry.records()
        records_cpu.append(time.thread_time() - started)
        yield
        yield from history.recording(records, now)

    theirs, theirs_part = steps(registry, bodies, main_step, times)
    del before, main_step
    registry = HiveRegistry()
    gc.collect()

    defaults = FleetHistory()
    registry.observe(defaults.hive_changed)
    beat_all(registry, bodies)
    defaults.record([], T0)  # nothing listed: only what the registry noted
    step_s = defaults.settings.fine_step_s
    default_times = [(T0 + step_s * k, k < ROUNDS or k == 60) for k in range(1, 61)]
    default_cpu, default_part = steps(registry, bodies, defaults.recording, default_times)
    tick_s, _ = timed_parts(defaults.recording(T0 + 301))  # within a step: nothing noted new
    assert len(ours) == len(theirs) == len(default_cpu) == ROUNDS

    new_s, main_s = statistics.median(ours[:-1]), statistics.median(theirs[:-1])
    default_s = statistics.median(default_cpu[:-1])
    FIGURES[f"history ingest: added to each heartbeat (hive_changed), {HIVES:,} hives"] = (
        f"{ingest_s * 1e6:.2f} us = {ingest_s * HIVES * 100:.2f} % of a core at 1 Hz")
    FIGURES[f"history step, every figure at 1 s ({series / 1e6:.2f} M series), CPU"] = (
        f"{new_s * 1e3:.1f} ms = {new_s * 100:.1f} % of a core (with a 10 s close "
        f"{ours[-1] * 1e3:.0f} ms); main {main_s * 1e3:.1f} ms (records() "
        f"{statistics.median(records_cpu) * 1e3:.1f} ms of it, close {theirs[-1] * 1e3:.0f} "
        f"ms); {main_s / new_s:.1f}x less")
    FIGURES["history step, every figure, longest part between checkpoints"] = (
        f"{ours_part * 1e3:.1f} ms; main {theirs_part * 1e3:.1f} ms")
    FIGURES[f"history step at the defaults ({len(defaults):,} series), CPU"] = (
        f"{default_s * 1e3:.1f} ms every {step_s:g} s (a tick between: {tick_s * 1e3:.2f} ms) "
        f"= {(default_s / step_s + ingest_s * HIVES) * 100:.2f} % of a core with ingest's "
        f"share; with a 5 min close {default_cpu[-1] * 1e3:.0f} ms; longest part "
        f"{default_part * 1e3:.1f} ms")
    FIGURES["history query over the whole fleet (refused), CPU"] = f"{refused_s * 1e3:.1f} ms"
    FIGURES["history query of one hive (112 series), CPU"] = f"{one_s * 1e3:.1f} ms"
    FIGURES["history first step, every figure (rows handed out)"] = f"{first_s * 1e3:.0f} ms"
    assert main_s / new_s >= 1.2 and default_s / step_s + ingest_s * HIVES <= 0.05


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def held_hives(history) -> int:
    """Hives with every worker's series held (none refused by the budget)."""
    return sum(1 for rows in history.hives.values()
               if rows.worker_rows and min(rows.worker_rows.values()) >= 0)


def measure_memory(which: str, hives: int) -> dict:
    """In a process of its own (RSS says nothing once a process has freed large arrays): a
    registry of ``hives`` hives, then the default history of ``which`` ("this" tree or "main",
    importable) recording them, every ring written through (resident, as after 6 hours)."""
    gc.set_threshold(*GC_THRESHOLDS)
    start = rss_bytes()
    registry = HiveRegistry()
    base = [eight_gpu_heartbeat("hive-00000", seed) for seed in range(64)]
    decode = msgspec.json.Decoder(HiveHeartbeat).decode
    for index in range(hives):
        registry.update_hive(decode(base[index % 64].replace(
            b'"hive-00000"', f'"hive-{index:05d}"'.encode())), admit=False)
    gc.collect()
    with_registry = rss_bytes()
    if which == "main":
        from rbee_history_main import FleetHistory as Main
        history = Main(HistorySettings(**MAIN_DEFAULTS))
    else:
        history = FleetHistory()
    history.record(registry.records(), T0)
    for store in (history.values, history.plugins):
        for tier in (store.fine, store.coarse):
            for block in tier.blocks:
                block[...] = 1
    gc.collect()
    end = rss_bytes()
    return dict(registry=with_registry - start, history=end - with_registry, rss=end,
                held=held_hives(history), used=history.budget.used,
                budget=history.settings.max_bytes, refused=history.refused)


def test_memory(benchmark, main_history):
    outcome = {}
    folder = Path(sys.modules[main_history.__module__].__file__).parents[1]
    for which in ("this", "main"):
        run = subprocess.run(
            [sys.executable, "-m", "bench.test_bench_history", which, str(HIVES)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{folder}"}, capture_output=True,
            text=True, timeout=600, check=True)
        outcome[which] = json.loads(run.stdout.splitlines()[-1])
    benchmark.pedantic(lambda: None, rounds=1)
    for which, o in outcome.items():
        FIGURES[f"history at {HIVES:,} hives, default settings, {which}"] = (
            f"{o['held']:,} hives held ({o['refused']:,} series refused), "
            f"{o['used'] / 2**20:.0f} MiB of {o['budget'] / 2**20:.0f} MiB budget, RSS "
            f"+{o['history'] / 2**20:.0f} MiB (the process: {o['rss'] / 2**20:.0f} MiB, its "
            f"registry {o['registry'] / 2**20:.0f} MiB)")
    this = outcome["this"]
    assert this["held"] == HIVES and this["used"] <= this["budget"]
    assert this["history"] <= this["budget"] * 1.35


if __name__ == "__main__":
    print(json.dumps(measure_memory(sys.argv[1], int(sys.argv[2]))))
