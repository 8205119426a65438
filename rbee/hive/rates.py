"""The reference reading a worker's rates (CPU %, I/O MB/s) are measured against.

A rate is a counter's increase over the wall time between two readings, and it is only as true as
that window is long. CFS enforces a CPU quota per 100 ms period (a worker limited to 25 % runs at
full speed for 25 ms, then waits 75 ms), and the kernel charges CPU time per scheduler tick, so
over a few milliseconds a worker under a 25 % quota reads anything from 0 to 195 % (measured on
this host: 195 % at 2 ms windows, 119 % at 10 ms, 53 % at 50 ms, 26 % at 200 ms, 25 % at 1 s).
The hive collects at once whenever any worker spawns or exits, so without a floor every such event
gave every other worker a window of a few milliseconds, and crash-looping workers filled the
history with readings of 164-233 % under quotas of 25-100 %.

So each worker keeps its recent readings, and a rate is measured against the newest one at least
``collect.rate_window_s`` old: windows are never shorter than that, however often the hive
collects. Over a window W the quota's period adds at most one period of quota (100 ms / W: 10 % of
the limit at 1 s). A worker younger than the floor has no rate yet (``rate_window_s`` 0), as on its
first reading; a respawned worker starts with no readings, so no window spans two processes.
"""

from __future__ import annotations

from collections import deque

from .._sample import StatSample

MAX_READINGS = 64
"""Readings kept per worker: enough for a floor of many ticks, bounded however often it ticks."""


class RateWindow:
    """A worker's recent (time, sample) readings; ``advance`` gives the reference for a rate."""

    __slots__ = ("floor_s", "readings")

    def __init__(self, floor_s: float) -> None:
        self.floor_s = floor_s
        self.readings: deque[tuple[float, StatSample]] = deque(maxlen=MAX_READINGS)

    def advance(self, now: float, sample: StatSample) -> tuple[StatSample | None, float]:
        """Record this reading; return the reference reading and the window in seconds, or
        (None, 0.0) while no reading is at least ``floor_s`` old."""
        readings = self.readings
        reference: tuple[float, StatSample] | None = None
        while readings and now - readings[0][0] >= self.floor_s:
            reference = readings.popleft()
        if reference is not None:
            readings.appendleft(reference)  # the newest old-enough one stays the next reference
        readings.append((now, sample))
        if reference is None or now <= reference[0]:
            return None, 0.0
        return reference[1], now - reference[0]
