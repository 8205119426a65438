"""Declared counters turned into rates (``MetricSpec(kind="counter", as_rate=True)``).

A plugin reads a counter (context switches, packets, ...) and stores it as is; the hive turns it
into a per-second rate in the record, measured as the built-in rates are (``rbee.hive.rates``):
against the newest earlier reading at least ``collect.rate_window_s`` old, so a burst of ticks
(a spawn or an exit makes the hive collect at once) never gives a window of milliseconds. Until
such a reading exists, and after the counter went backwards (the worker's process restarted),
the figure is absent from the record: unknown, never 0.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from ._view import WorkerView

OWNER = "rbee.counter_rates"
"""The ``WorkerView.state`` slot the readings live in: they are dropped with the worker."""
MAX_READINGS = 64


class CounterRates:
    __slots__ = ("floor_s", "keys")

    def __init__(self, keys: Iterable[str], floor_s: float) -> None:
        self.keys = frozenset(keys)
        self.floor_s = floor_s

    def apply(self, view: WorkerView, now: float, metrics: dict[str, float]) -> None:
        """Replace each declared counter in ``metrics`` by its rate (or drop it while none can
        be measured), and remember this reading for later ones."""
        counters = {key: metrics.pop(key) for key in self.keys if key in metrics}
        if not counters:
            return
        state = view.state(OWNER)
        times: list[float] = state.setdefault("times", [])
        readings: list[dict[str, float]] = state.setdefault("readings", [])
        older = bisect_right(times, now - self.floor_s)
        if older:
            del times[:older - 1], readings[:older - 1]  # the reference stays, older ones go
            elapsed = now - times[0]
            if elapsed > 0:
                reference = readings[0]
                for key, value in counters.items():
                    before = reference.get(key)
                    if before is not None and value >= before:
                        metrics[key] = (value - before) / elapsed
        times.append(now)
        readings.append(counters)
        if len(times) > MAX_READINGS:
            del times[0], readings[0]
