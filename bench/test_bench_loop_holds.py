"""Who holds the queen's event loop at 2,000 / 5,000 / 10,000 eight-GPU hives, and for how long
(issue 24): ``bench/loopholds.py`` run once per fleet size, each in a process of its own (a real
``QueenServer``, the hives' heartbeats ingested in process at 1 Hz, a pick every 100 ms, a trio
``Instrument`` timing every task step).

    ./dev bench bench/test_bench_loop_holds.py -s
    RBEE_BENCH_BEFORE=/tmp/rbee-before RBEE_BENCH_HOLDS_STEPS=2000,10000 \\
        ./dev bench bench/test_bench_loop_holds.py -s

Per size, a table: each task's longest single step (CPU time of the loop thread, and wall
time), its share of a core, its steps; the cyclic collector's pauses; how late a task that sleeps
1 ms wakes (p50 / p99 / max: what a ready heartbeat waits for the loop); RSS per hive. With
``RBEE_BENCH_BEFORE`` (a checkout: ``git archive main | tar -x -C /tmp/rbee-before``) the same
script measures that tree's queen in the same run. ``RBEE_BENCH_HOLDS_ARGS`` passes more
arguments (``--metrics``: a ``/metrics`` render every 5 s in a thread; ``--stream``: one SSE
client). Target: no step of a periodic task over ~5 ms at 10,000 hives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIGURES

REPO = Path(__file__).parents[1]
SCRIPT = Path(__file__).with_name("loopholds.py")
BEFORE = os.environ.get("RBEE_BENCH_BEFORE")
STEPS = [int(n) for n in os.environ.get("RBEE_BENCH_HOLDS_STEPS", "2000,5000,10000").split(",")]
EXTRA = os.environ.get("RBEE_BENCH_HOLDS_ARGS", "").split()
HOLD_MS = 5.0
PERIODIC = ("MemoryStore.run", "MemoryStore._summary_loop", "QueenServer._history_loop")
"""The queen's own periodic tasks (the sweep, the summary, history's step)."""
RESULTS: dict[tuple[str, int], dict] = {}


def measure(source: Path, hives: int) -> dict:
    """One run of the script against the queen in ``source``."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(hives), *EXTRA], cwd=source, capture_output=True,
        text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(source)})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(side: str, figures: dict) -> list[str]:
    lines = [f"loop holds [{side}] {figures['hives']:,} hives: queen process CPU "
             f"{figures['cpu_pct']:.0f} %, probe late p50 {figures['probe_ms']['p50']:.2f} / "
             f"p99 {figures['probe_ms']['p99']:.2f} / max {figures['probe_ms']['max']:.2f} ms, "
             f"RSS {figures['rss_mb']:.0f} MB (+{figures['rss_kb_per_hive']:.1f} KB/hive, "
             f"{figures['tracked_objects_per_hive']:.0f} GC-tracked objects/hive)",
             f"  {'task':<34} {'longest CPU':>12} {'longest wall':>13} {'share':>7} {'steps':>7}"]
    for name, task in figures["tasks"].items():
        lines.append(f"  {name:<34} {task['longest_ms']:>9.2f} ms {task['longest_wall_ms']:>10.2f}"
                     f" ms {task['share_pct']:>6.1f}% {task['steps']:>7}")
    for generation, pauses in figures["gc"].items():
        lines.append(f"  gc generation {generation}: {pauses['count']} collections, longest "
                     f"{pauses['longest_ms']:.1f} ms, {pauses['total_ms']:.0f} ms in all")
    if figures.get("gc_full_ms") is not None:
        lines.append(f"  a full collection after the window: {figures['gc_full_ms']:.1f} ms")
    return lines


@pytest.mark.parametrize("hives", STEPS)
@pytest.mark.parametrize("side", ["after", "before"])
def test_loop_holds(benchmark, side, hives):
    if side == "before" and not BEFORE:
        pytest.skip("RBEE_BENCH_BEFORE is not set: only this tree's queen is measured")
    source = Path(BEFORE) if side == "before" else REPO
    figures: dict = {}
    benchmark.pedantic(lambda: figures.update(measure(source, hives)), rounds=1, iterations=1)
    RESULTS[side, hives] = figures
    print("\n".join(table(side, figures)), flush=True)
    periodic = {name: figures["tasks"].get(name, {}).get("longest_ms", 0.0) for name in PERIODIC}
    FIGURES[f"loop holds [{side}] {hives:>6,} hives"] = (
        ", ".join(f"{name} {ms:.1f} ms" for name, ms in periodic.items())
        + f", pick {figures['tasks'].get('__main__.picks', {}).get('longest_ms', 0):.1f} ms"
        + f"; probe p99 {figures['probe_ms']['p99']:.1f} ms")
    benchmark.extra_info.update(figures)
    after = RESULTS.get(("after", hives))
    if side == "before" and after is not None:
        FIGURES[f"loop holds before/after {hives:>6,} hives"] = ", ".join(
            f"{name} {figures['tasks'].get(name, {}).get('longest_ms', 0):.1f} / "
            f"{after['tasks'].get(name, {}).get('longest_ms', 0):.1f} ms"
            for name in (*PERIODIC, "__main__.picks"))
    assert figures["tasks"], figures
