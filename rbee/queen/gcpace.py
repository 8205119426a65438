"""The queen's cyclic garbage collection, paced so that no automatic collection walks the fleet
while heartbeats wait.

Why: a queen holds every hive's connection (its task, coroutines, socket; ~70 tracked objects)
and last heartbeat (about a dozen lists, replaced each second). CPython counts a young
collection due by allocations *less deallocations*, and a heartbeat that replaces its hive's last
one frees about what it allocates: so collections come rarely, and when one does its young
generation holds everything allocated since the last, which in a steady fleet is the whole
fleet's heartbeats. At 3,200 eight-GPU hives on a channel those collections took 67-120 ms
each, all finding nothing, and the backlog behind each set heartbeat p99 (docs/scale.md, "The
cyclic collector").

What instead: every ``gc.freeze_every_s`` (0.1 s) what exists is frozen (``gc.freeze``: a
splice of the collector's lists, O(1), which also zeroes its allocation count), so no automatic
collection ever walks more than that interval's survivors. Frozen objects still die by
reference counting as before; only garbage *cycles* wait, for the full collection (unfreeze,
collect, freeze) every ``gc.full_every_s`` (600 s), which walks everything once and holds the
loop meanwhile (at 3,200 hives ~0.3 s). The queen makes few cycles: every collection of a
steady fleet measured found none, and each full collection logs what it found.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..settings import GcSettings
from .ticks import every

log = logging.getLogger(__name__)


@dataclass
class FullCollection:
    """What the last full collection found and cost."""

    objects: int
    """Tracked objects alive after it (the new baseline)."""
    unreachable: int
    """Garbage found: objects in cycles that reference counting could not free."""
    seconds: float
    """How long the loop was held."""


class GcPacer:
    """The queen's collector policy (``gc`` in queen.yaml); ``run`` is its loop."""

    def __init__(self, settings: GcSettings) -> None:
        self.settings = settings
        self.full_collections = 0
        self.last: FullCollection | None = None

    def collect_fully(self) -> FullCollection:
        """Unfreeze, collect every generation, freeze what is left; the loop is held meanwhile."""
        began = time.perf_counter()
        gc.unfreeze()
        unreachable = gc.collect()
        gc.freeze()
        self.full_collections += 1
        self.last = FullCollection(gc.get_freeze_count(), unreachable,
                                   time.perf_counter() - began)
        log.info("full garbage collection: %d objects kept, %d unreachable, %.1f ms",
                 self.last.objects, unreachable, self.last.seconds * 1e3)
        return self.last

    async def run(self) -> None:
        """Freeze every ``freeze_every_s`` and collect fully every ``full_every_s``; on
        leaving, everything is unfrozen (the collector as Python runs it)."""
        if self.settings.freeze_every_s == 0:
            return
        gc.freeze()
        full_at = trio.current_time() + self.settings.full_every_s
        try:
            async for now in every(self.settings.freeze_every_s):
                if now >= full_at:
                    self.collect_fully()
                    full_at = trio.current_time() + self.settings.full_every_s
                else:
                    gc.freeze()
        finally:
            gc.unfreeze()


class GcGauges(Collector):
    """The pacer on ``/metrics``: how often the loop was held for a full collection, and how
    long the last one took."""

    def __init__(self, pacer: GcPacer) -> None:
        self.pacer = pacer

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("rbee_queen_gc_full_collections",
                                  "Full garbage collections (each holds the loop)",
                                  value=self.pacer.full_collections)
        last = self.pacer.last
        yield GaugeMetricFamily("rbee_queen_gc_last_full_seconds",
                                "How long the last full garbage collection held the loop",
                                value=last.seconds if last else 0.0)
        yield GaugeMetricFamily("rbee_queen_gc_last_full_objects",
                                "Tracked objects alive after the last full garbage collection",
                                value=last.objects if last else 0)
