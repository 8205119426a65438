"""One model's pickable workers as numpy columns, one slot per worker.

A pick over a model's workers must cost microseconds at 10,000 of them, so their figures live in
columns that a pick reads with a few vector operations (``rbee/queen/pick/index.py``), never a
Python loop over the fleet. A heartbeat writes its workers' rows in place; a worker that leaves
frees its slot for the next one, and a freed slot holds an infinite score, so it is never chosen.

The in-flight picks of a slot are kept oldest first as ``(sequence, picked_at)`` with the load
(running + waiting) they are counted against: both ways a pick ends (the engine's counters rose
above that load in a reading taken after it, or its time to live ran out) take the oldest first.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import numpy as np


class WorkerRef(NamedTuple):
    """Who a slot holds, as an answer names it."""

    hive_id: str
    group: str
    instance: str
    endpoint: str


class Row(NamedTuple):
    """One worker's figures as a heartbeat gives them (NaN: not known)."""

    base: float
    """Its score before in-flight picks (``PickWeights``)."""
    running: float
    waiting: float
    kv_cache_pct: float
    free_vram_mb: float
    idle: float
    """1.0 when idle by the registry's rule (``scheduling.is_idle``), else 0.0."""
    figures_at: float
    """When its engine figures were read (Unix seconds): -inf without an engine state."""
    received_at: float
    """When the queen received them, on the registry's clock."""
    score: float
    """``base`` plus the weight of its picks in flight, kept current: what a pick ranks by
    (a heartbeat gives ``base``; the table adds its picks)."""


BASE, RUNNING, WAITING, KV_CACHE, FREE_VRAM, IDLE, FIGURES_AT, RECEIVED_AT, SCORE = range(9)
_FREE_ROW = Row(math.inf, math.nan, math.nan, math.nan, math.nan, 0.0, -math.inf, 0.0, math.inf)


class InFlight:
    """A slot's picks in flight, oldest first, and the engine load they are counted against."""

    __slots__ = ("baseline", "picks")

    def __init__(self, baseline: float) -> None:
        self.baseline = baseline
        self.picks: deque[tuple[int, float]] = deque()


class ModelTable:
    """The pickable workers of one model."""

    __slots__ = ("columns", "count", "free", "high", "pending", "refs", "weight")

    def __init__(self, in_flight_weight: float, capacity: int = 16) -> None:
        self.weight = in_flight_weight
        self.columns = np.tile(np.array(_FREE_ROW, dtype=np.float64)[:, None], (1, capacity))
        """One row per figure of ``Row``, one column per slot: a figure of every worker is
        contiguous, as a pick reads it, and a heartbeat writes a worker's in one assignment."""
        self.refs: list[WorkerRef | None] = [None] * capacity
        self.pending: dict[int, InFlight] = {}
        """Per slot with picks in flight."""
        self.free: list[int] = []
        self.high = 0
        """Slots ever used: a pick reads ``[:high]``."""
        self.count = 0

    def column(self, which: int) -> np.ndarray:
        return self.columns[which, :self.high]

    def take(self, ref: WorkerRef) -> int:
        """A slot for a worker new to this table."""
        if self.free:
            slot = self.free.pop()
        else:
            slot = self.high
            if slot == len(self.refs):
                self._grow()
            self.high += 1
        self.refs[slot] = ref
        self.count += 1
        return slot

    def release(self, slot: int) -> None:
        """A worker left (gone, not pickable, another model): its slot is never chosen again
        until reused, and its picks in flight are forgotten."""
        self.columns[:, slot] = _FREE_ROW
        self.pending.pop(slot, None)
        self.refs[slot] = None
        self.free.append(slot)
        self.count -= 1

    def write(self, slot: int, ref: WorkerRef, row: Row) -> None:
        """A worker's new figures. Its picks made before its engine figures were read are in
        them as far as its load (running + waiting) rose over the one they were counted
        against: that many of them, oldest first, are done."""
        if self.refs[slot] != ref:
            self.refs[slot] = ref
        self.columns[:, slot] = row
        waiting = self.pending.get(slot)
        if waiting is None:
            return
        self.columns[SCORE, slot] = row[BASE] + self.weight * len(waiting.picks)
        load = row[RUNNING] + row[WAITING]
        rise = load - waiting.baseline
        if rise >= 1:  # NaN (no engine state) is not
            seen = sum(1 for _, picked_at in waiting.picks if picked_at < row[FIGURES_AT])
            if seen:
                waiting.baseline = load
                self.end_picks(slot, min(seen, int(rise)))

    def add_pick(self, slot: int, sequence: int, picked_at: float) -> None:
        waiting = self.pending.get(slot)
        if waiting is None:
            load = self.columns[RUNNING, slot] + self.columns[WAITING, slot]
            waiting = self.pending[slot] = InFlight(0.0 if math.isnan(load) else load)
        waiting.picks.append((sequence, picked_at))
        self._count(slot, 1.0)

    def end_picks(self, slot: int, count: int, *, up_to: int | None = None) -> None:
        """End the ``count`` oldest picks of a slot, or (``up_to``) those of sequence up to it."""
        waiting = self.pending.get(slot)
        if waiting is None:
            return
        picks = waiting.picks
        while picks and (count > 0 if up_to is None else picks[0][0] <= up_to):
            picks.popleft()
            self._count(slot, -1.0)
            count -= 1
        if not picks:
            del self.pending[slot]

    def in_flight(self, slot: int) -> int:
        waiting = self.pending.get(slot)
        return 0 if waiting is None else len(waiting.picks)

    def _count(self, slot: int, change: float) -> None:
        self.columns[SCORE, slot] += self.weight * change

    def _grow(self) -> None:
        size = len(self.refs)
        self.columns = np.concatenate(
            [self.columns, np.tile(np.array(_FREE_ROW)[:, None], (1, size))], axis=1)
        self.refs.extend([None] * size)
