"""Ingest does no work proportional to the fleet (issue 24): a heartbeat into a memory-store
queen of 5,000 hives costs what it costs in one of 50, with a stream client listening (so the
event is encoded and framed). Compared by ratio in one run (CPU time, the best of several rounds,
the two fleets taking turns), so a loaded machine slows both alike; the margin is generous."""

from __future__ import annotations

import gc
import time

import trio

from rbee.config import QueenConfig, RegistrySettings
from rbee.contract import decode_heartbeat
from rbee.queen.fleet import open_fleet

from .fleetload import eight_gpu_heartbeat

BEATS = 400
ROUNDS = 7
MOST = 2.0


async def _fleet(hives: int):
    """A memory-store queen's fleet of ``hives`` hives, and 400 heartbeats of its first."""
    fleet = open_fleet(QueenConfig(registry=RegistrySettings(max_hives=hives,
                                                             new_hives_burst=hives)))
    for n in range(hives):
        body = eight_gpu_heartbeat(f"hive-{n:05d}", n % 50)
        await fleet.store.ingest(decode_heartbeat(body), len(body))
    body = eight_gpu_heartbeat("hive-00000", 0)
    return fleet, [decode_heartbeat(body) for _ in range(BEATS)], len(body)


async def _costs_per_beat(sizes: tuple[int, ...]) -> list[float]:
    """CPU seconds per heartbeat of one hive into a fleet of each size, with a stream client
    listening: the best of ``ROUNDS`` rounds, the fleets taking turns, so that this machine's
    speed, which moves by a third within minutes, moves under both alike. The collector is
    frozen over the rounds, as the queen's pacer keeps it (``rbee/queen/gcpace.py``): a
    collection walks the whole heap, which is a larger fleet's, not the heartbeat's work."""
    fleets = [await _fleet(hives) for hives in sizes]
    best = [float("inf")] * len(sizes)
    gc.collect()
    gc.freeze()
    try:
        for _ in range(ROUNDS):
            for at, (fleet, beats, size) in enumerate(fleets):
                with fleet.broadcaster.subscribe():
                    started = time.process_time()
                    for beat in beats:
                        await fleet.store.ingest(beat, size)
                    best[at] = min(best[at], (time.process_time() - started) / BEATS)
    finally:
        gc.unfreeze()
    return best


def test_a_heartbeat_costs_the_same_in_a_small_and_a_large_fleet():
    small, large = trio.run(_costs_per_beat, (50, 5000))
    assert large <= MOST * small, (f"one heartbeat: {small * 1e6:.0f} µs among 50 hives, "
                                   f"{large * 1e6:.0f} µs among 5,000")
