"""The queen's schedules: loops that run every so often on trio's clock (so a test drives them
with ``trio.testing.MockClock``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio


async def every(interval: float) -> AsyncIterator[float]:
    """Yield at start + interval, start + 2 * interval, ... (no drift from the work between);
    ticks missed while the loop was busy are skipped, not bunched."""
    deadline = trio.current_time()
    while True:
        deadline += interval
        await trio.sleep_until(deadline)
        now = trio.current_time()
        if now - deadline > interval:
            deadline = now
        yield deadline
