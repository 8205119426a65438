"""A fleet that comes back: a restarted queen (empty registry, default admission) facing a whole
fleet of ``max_hives`` hives at once, each retrying after the Retry-After it was given (whole
seconds, plus jitter, as a hive does). With the previous defaults (100/s after a burst of 1,000)
the last hive came back after about 90 s. Issue 24's target: all of them reporting again within 30 s. The schedule
runs on trio's MockClock, with the registry's clock on it."""

from __future__ import annotations

import math
import random

import trio
import trio.testing

from rbee import AdmissionError
from rbee.config import RegistrySettings
from rbee.queen.registry import HiveRegistry

from .builders import heartbeat

COMEBACK_S = 30.0


async def _fleet_comes_back(settings: RegistrySettings, hives: int) -> list[float]:
    """When each hive was admitted (seconds after the restart)."""
    registry = HiveRegistry(settings, clock=trio.current_time)
    start = trio.current_time()
    admitted: list[float] = []
    rng = random.Random(24)

    async def hive(n: int) -> None:
        beat = heartbeat(f"hive-{n:05d}")
        await trio.sleep(rng.uniform(0, 1))  # the fleet's beats, spread over one period
        while True:
            try:
                registry.update_hive(beat)
            except AdmissionError as exc:
                assert exc.retry_after_s is not None, exc  # never "full" at max_hives
                # as a POST answers it: Retry-After in whole seconds, at least 1
                await trio.sleep(max(1, math.ceil(exc.retry_after_s)) + rng.uniform(0, 0.5))
            else:
                admitted.append(trio.current_time() - start)
                return

    async with trio.open_nursery() as nursery:
        for n in range(hives):
            nursery.start_soon(hive, n)
    assert len(registry) == hives
    return admitted


def test_a_restarted_queen_takes_back_a_whole_fleet_within_30_s():
    settings = RegistrySettings()
    admitted = trio.run(_fleet_comes_back, settings, settings.max_hives,
                        clock=trio.testing.MockClock(autojump_threshold=0))
    assert max(admitted) <= COMEBACK_S, (
        f"the last of {settings.max_hives:,} hives came back after {max(admitted):.1f}s "
        f"(new_hives_per_s {settings.new_hives_per_s:g}, burst {settings.new_hives_burst})")
    # the bucket still bounds it: no more than the burst plus the rate came in by any time
    for t in (1.0, 5.0, 10.0):
        assert sum(1 for a in admitted if a <= t) <= (settings.new_hives_burst
                                                      + settings.new_hives_per_s * t) + 1
