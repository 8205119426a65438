"""Ingest does no work proportional to the fleet (issue 24): a heartbeat into a memory-store
queen of 5,000 hives costs what it costs in one of 50, with a stream client listening (so the
event is encoded and framed). Compared by ratio in one run (CPU time, the best of several rounds),
so a loaded machine slows both alike; the margin is generous."""

from __future__ import annotations

import time

import trio

from rbee.config import QueenConfig, RegistrySettings
from rbee.contract import decode_heartbeat
from rbee.queen.fleet import open_fleet

from .fleetload import eight_gpu_heartbeat

BEATS = 400
MOST = 2.0


async def _cost_per_beat(hives: int) -> float:
    """CPU seconds per heartbeat of one hive into a fleet of ``hives`` (best of 5 rounds)."""
    fleet = open_fleet(QueenConfig(registry=RegistrySettings(max_hives=hives,
                                                             new_hives_burst=hives)))
    for n in range(hives):
        body = eight_gpu_heartbeat(f"hive-{n:05d}", n % 50)
        await fleet.store.ingest(decode_heartbeat(body), len(body))
    body = eight_gpu_heartbeat("hive-00000", 0)
    beats = [decode_heartbeat(body) for _ in range(BEATS)]
    best = float("inf")
    with fleet.broadcaster.subscribe():
        for _ in range(5):
            started = time.process_time()
            for beat in beats:
                await fleet.store.ingest(beat, len(body))
            best = min(best, (time.process_time() - started) / BEATS)
    return best


def test_a_heartbeat_costs_the_same_in_a_small_and_a_large_fleet():
    small = trio.run(_cost_per_beat, 50)
    large = trio.run(_cost_per_beat, 5000)
    assert large <= MOST * small, (f"one heartbeat: {small * 1e6:.0f} µs among 50 hives, "
                                   f"{large * 1e6:.0f} µs among 5,000")
