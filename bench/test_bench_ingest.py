"""The POST path and the registry at fleet scale (issue 24), beside bench/test_bench_fleet.py.

``test_post_path``: the fleet benchmark's ramp (its load process, its queen on CPU 0) with the
history's recording moved out of the window (``history.fine_step_s: 3600``), so the queen's CPU
per heartbeat is what the POST path and the registry cost, for this tree and, with
``RBEE_BENCH_BEFORE``, that tree in the same run. ``RBEE_BENCH_INGEST_STEPS`` (default 400,800).

``test_registry_memory``: the bytes the registry and the memory store hold per eight-GPU,
eight-worker hive at the defaults (tracemalloc), as the slope between two fleet sizes, so the
fixed part (the kept replay events, bounded by ``stream.replay_events``) is not counted per hive.
Target: at most 20 KB per hive.
"""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest
import trio

from rbee.config import QueenConfig, RegistrySettings
from rbee.contract import decode_heartbeat
from rbee.queen.fleet import open_fleet
from tests.fleetload import eight_gpu_heartbeat

from . import test_bench_fleet as fleet
from .conftest import FIGURES

STEPS = [int(n) for n in os.environ.get("RBEE_BENCH_INGEST_STEPS", "400,800").split(",")]
NO_HISTORY = {"fine_step_s": 3600, "fine_retention_s": 3600, "coarse_step_s": 3600,
              "coarse_retention_s": 21600}
RESULTS: dict[str, list[dict]] = {}


@pytest.mark.parametrize("side", ["after", "before"])
def test_post_path(benchmark, tmp_path, monkeypatch, side):
    monkeypatch.setattr(fleet, "STEPS", STEPS)
    monkeypatch.setattr(fleet, "QUEEN_CONFIG", {**fleet.QUEEN_CONFIG, "history": NO_HISTORY,
                                                "http": {"max_connections": max(STEPS) + 512}})
    fleet.RESULTS.clear()
    fleet.test_fleet(benchmark, tmp_path, side, "post")
    RESULTS[side] = fleet.RESULTS[side]
    for step in RESULTS[side]:
        FIGURES[f"POST path [{side}] {step['hives']:>5} hives"] = (
            f"queen CPU {step['queen_cpu_us_per_hb']:.0f} µs/heartbeat ({step['queen_cpu_pct']:.0f} "
            f"%), p99 {step['p99_ms']:.1f} ms, {step['ok']:,} of {step['sent']:,} answered 200")
    if side == "before" and "after" in RESULTS:
        after = {s["hives"]: s["queen_cpu_us_per_hb"] for s in RESULTS["after"]}
        before = {s["hives"]: s["queen_cpu_us_per_hb"] for s in RESULTS["before"]}
        for hives in sorted(after.keys() & before.keys()):
            FIGURES[f"POST path before/after at {hives:>5} hives"] = (
                f"{before[hives]:.0f} / {after[hives]:.0f} µs per heartbeat = "
                f"{before[hives] / after[hives]:.2f}x the heartbeats per queen CPU-second")


async def _held_bytes(hives: int, listed: bool) -> int:
    """The bytes a memory-store queen's fleet holds after each of ``hives`` hives sent two
    heartbeats, and, if ``listed``, the workers were listed since (each hive's listing cache,
    kept until its next heartbeat, filled)."""
    config = QueenConfig(registry=RegistrySettings(max_hives=hives, new_hives_burst=hives))
    bodies = [eight_gpu_heartbeat(f"hive-{n:05d}", n) for n in range(hives)]
    gc.collect()
    tracemalloc.start()
    try:
        store = open_fleet(config)
        for _ in range(2):
            for body in bodies:
                await store.store.ingest(decode_heartbeat(body), len(body))
        store.store.totals.event_now()  # the summary's share of each hive (summary.HivePart)
        if listed:
            store.registry.workers_page()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return held


def test_registry_memory(benchmark):
    small, large = 1500, 3000
    per_hive = {}

    def measure() -> None:
        for listed in (False, True):
            held = {hives: trio.run(_held_bytes, hives, listed) for hives in (small, large)}
            per_hive[listed] = (held[large] - held[small]) / (large - small)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    FIGURES["registry memory per hive (8 GPUs, 8 workers)"] = (
        f"{per_hive[False] / 1024:.1f} KB; {per_hive[True] / 1024:.1f} KB with every hive listed "
        f"since its last heartbeat (slope {small:,} -> {large:,} hives)")
    benchmark.extra_info.update(registry_bytes_per_hive=per_hive[False],
                                listed_registry_bytes_per_hive=per_hive[True])
    assert max(per_hive.values()) <= 20 * 1024, per_hive
