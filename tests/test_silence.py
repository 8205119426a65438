"""The registry's sweep at the cost of its silent hives (``silence.SilenceBook``) judges as the
whole-fleet rule does: a model of the fleet (when each hive was first and last heard from, which
are flagged, whether the guard holds), judged by ``silence.judge`` over every hive before each
sweep, gives the same stale events, removals and held hives as the registry, through random
heartbeats, removals, mass silences and queen stalls."""

from __future__ import annotations

import random

import pytest

from rbee.config import RegistrySettings
from rbee.queen.registry import HiveRegistry
from rbee.queen.silence import StallRule, judge

from .builders import heartbeat

SETTINGS = RegistrySettings(stale_after_s=3, remove_after_s=10, established_after_s=5,
                            mass_silence_min_hives=4, mass_silence_fraction=0.5,
                            cleanup_interval_s=1)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Model:
    """The fleet as the whole-fleet rule sees it."""

    def __init__(self) -> None:
        self.heard: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.flagged: set[str] = set()
        self.holding = False
        self.stall = StallRule(SETTINGS)

    def report(self, hive_id: str, now: float) -> None:
        self.first.setdefault(hive_id, now)
        self.heard[hive_id] = now
        self.flagged.discard(hive_id)

    def remove(self, hive_id: str) -> None:
        for held in (self.heard, self.first):
            held.pop(hive_id, None)
        self.flagged.discard(hive_id)

    def sweep(self, now: float):
        counted_from = self.stall.restart_from(now)
        if counted_from is not None:
            self.heard = {h: max(t, counted_from) for h, t in self.heard.items()}
        silent = {h: now - t for h, t in self.heard.items()}
        established = {h for h in self.heard
                       if self.heard[h] - self.first[h] >= SETTINGS.established_after_s}
        verdict = judge(silent, self.flagged, SETTINGS, established=established,
                        holding=self.holding)
        self.established = established - set(verdict.expired)
        self.holding, self.flagged = verdict.holding, set(verdict.stale)
        for hive_id in verdict.expired:
            self.remove(hive_id)
        return verdict


@pytest.mark.parametrize("seed", range(6))
def test_the_sweep_judges_as_the_whole_fleet_rule(seed):
    rng, clock, model = random.Random(seed), Clock(), Model()
    registry = HiveRegistry(SETTINGS, clock=clock)
    hives = [f"hive-{n:02d}" for n in range(24)]
    judged = {"stale": 0, "removed": 0, "held": 0}
    quiet = 0
    for _ in range(400):
        if not quiet and rng.random() < 0.04:  # now and then most of the fleet falls silent
            quiet = rng.randint(4, 16)
        quiet = max(0, quiet - 1)
        for hive_id in hives:
            if rng.random() < (0.02 if quiet else 0.7):
                registry.update_hive(heartbeat(hive_id))
                model.report(hive_id, clock.now)
        if rng.random() < 0.06:  # an operator's DELETE, or a hive's goodbye
            gone = rng.choice(hives)
            registry.remove_hive(gone)
            model.remove(gone)
        clock.now += rng.choice([0.5, 1.0, 1.0, 2.5, 4.0]) if rng.random() > 0.01 else 30.0
        result = registry.sweep()
        verdict = model.sweep(clock.now)
        assert [e.hive_id for e in result.stale] == verdict.newly_stale
        assert [e.hive_id for e in result.removed] == verdict.expired
        assert result.held == verdict.held
        assert {h.hive.id for h in registry.hives() if h.stale} == verdict.stale - {
            *verdict.expired}
        assert registry.hive_ids() == sorted(model.heard)
        assert registry._silences.established == len(model.established)  # what the guard counts
        judged["stale"] += len(result.stale)
        judged["removed"] += len(result.removed)
        judged["held"] += len(result.held)
    assert all(judged.values()), judged  # each kind of verdict was exercised


def test_a_sweep_reads_only_the_silent_hives():
    """10,000 hives of which three are silent: the sweep looks at those three and at the first
    hive heard from since (it stops there), not at the fleet."""
    clock = Clock()
    registry = HiveRegistry(RegistrySettings(max_hives=20_000, new_hives_burst=20_000,
                                             stale_after_s=3, remove_after_s=10), clock=clock)
    for n in range(3):
        registry.update_hive(heartbeat(f"silent-{n}"))
    clock.now += 5
    for n in range(10_000):
        registry.update_hive(heartbeat(f"hive-{n:05d}"))
    looked: list[str] = []
    hives = registry._hives

    class Watched(dict):
        def __getitem__(self, hive_id):
            looked.append(hive_id)
            return hives[hive_id]

    registry._hives = Watched(hives)
    result = registry.sweep()
    assert [e.hive_id for e in result.stale] == ["silent-0", "silent-1", "silent-2"]
    assert len(looked) < 20  # the silent ones (a few times each), the first fresh one
