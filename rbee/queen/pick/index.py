"""The pick: a model's best workers for the next request, from an index the registry keeps current.

The index follows the registry (``HiveRegistry.observe``): each change of a hive rewrites that
hive's rows in its models' tables (``tables.py``), so a pick never scans the fleet, and with the
redis store (whose mirror updates the registry) every queen picks from the whole fleet.

A pick ranks a model's candidates by score, lower first (``PickWeights``)::

    score = waiting * requests_waiting + running * requests_running + in_flight * picks in flight
            + kv_cache * kv_cache_pct / 100 + degraded_gpu * (a GPU of it degraded)

The first worker of the answer is *the* pick: it counts in flight on that worker until the
engine's own counters show it (a newer engine state whose running + waiting rose), or for
``in_flight_ttl_ms``, so two picks in a row spread instead of both landing on the worker that
looked emptiest (Dynamo's router predicts load the same way). Figures older than
``stale_after_ms``, or none (no engine state), are stale: ranked after every fresh worker, or
skipped (``pick.stale``); when every candidate is stale, ``pick.all_stale`` answers the best of
them anyway or refuses.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np
import trio

from ...config import PickSettings, RegistrySettings
from ...contract import (
    GpuDevice,
    Healthy,
    HiveInfo,
    PickAnswer,
    PickedWorker,
    WorkerTelemetry,
)
from ..scheduling import HiveVram, WorkerQuery, judged, unhealthy_gpus_of
from .tables import (
    FIGURES_AT,
    FREE_VRAM,
    IDLE,
    KV_CACHE,
    RECEIVED_AT,
    RUNNING,
    SCORE,
    WAITING,
    ModelTable,
    Row,
    WorkerRef,
)

PLACE_PER_PART = 32
"""Changed hives placed between two checkpoints by ``PickIndex.refresh`` (about 2 ms of eight
workers each on a loaded 2-core machine)."""
SATURATED = 1e12
"""Added to a stale worker's score when ranking (``pick.stale: saturate``): after every fresh one."""


class Ranking:
    """One pick's order over a table's slots, and what it counted."""

    __slots__ = ("all_stale", "candidates", "rank", "skipped", "stale")

    def __init__(self, rank: np.ndarray, stale: np.ndarray, candidates: int) -> None:
        self.rank, self.stale, self.candidates = rank, stale, candidates
        self.skipped = 0
        """Candidates left out as stale (``pick.stale: skip``)."""
        self.all_stale = False

    @property
    def offered(self) -> int:
        return self.candidates - self.skipped


class PickUnavailable(Exception):
    """No worker can be offered; the message says why (the API answers 503 with it)."""


class HiveView(Protocol):
    """What the index reads of a registry entry."""

    info: HiveInfo
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice]
    received_at: float

    @property
    def schedulable(self) -> bool: ...


Placed = dict[tuple[str, str], tuple[ModelTable, int]]


class PickIndex:
    """Every pickable worker (schedulable, running, with an endpoint and a model) by model.

    ``clock`` is the registry's (heartbeat ages); ``wall`` is Unix time (engine ``sampled_at``,
    picks in flight). Safe to call from any thread: one lock."""

    def __init__(self, settings: PickSettings, registry: RegistrySettings,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.settings, self.registry = settings, registry
        self.clock, self.wall = clock, wall
        self._tables: dict[str, ModelTable] = {}
        self._placed: dict[str, Placed] = {}
        self._expiry: deque[tuple[float, ModelTable, int, int]] = deque()
        """Picks in flight by when they expire (one TTL for all, so in pick order)."""
        self._sequence = itertools.count(1)
        self._due: dict[str, HiveView | None] = {}
        """Hives changed since the last pick, with their newest state (``hive_changed``)."""
        self._vram_due: dict[str, HiveView] = {}
        """Hives whose rows have no free-VRAM figure yet: computed by the first pick that asks
        (``min_free_vram_mb``), so heartbeats do not pay for a filter routers rarely use."""
        self._lock = threading.Lock()

    # -- following the registry ---------------------------------------------------------

    def hive_changed(self, hive_id: str, entry: HiveView | None) -> None:
        """A hive's new state (``None``: removed), noted only: the heartbeat that brings it pays
        a dict write, and the next pick (or ``in_flight``) places the hives changed since, each
        once however often it reported in between."""
        with self._lock:
            self._due[hive_id] = entry

    async def refresh(self, *, vram: bool = False) -> None:
        """Place the hives changed since the last pick (and, with ``vram``, their free-VRAM
        figures) ``PLACE_PER_PART`` at a time, a checkpoint between the parts, until fewer are
        left than a part: the pick that follows places the rest with no checkpoint between,
        so it answers from the registry as it is then. Without this, the first pick after a
        quiet second placed every hive of the fleet in one step of the event loop (10,000
        hives: ~0.3-0.7 s while no heartbeat was answered)."""
        while len(self._due) > PLACE_PER_PART or (vram and len(self._vram_due) > PLACE_PER_PART):
            with self._lock:
                self._apply_due(PLACE_PER_PART)
                if vram:
                    self._fill_vram(PLACE_PER_PART)
            await trio.lowlevel.checkpoint()

    def _apply_due(self, limit: int | None = None) -> None:
        """Each changed hive's pickable workers' rows written (a worker that changed model
        moves table), its leavers' slots freed, in the order the hives first changed; the
        first ``limit`` of them only, when given."""
        for hive_id, entry in _taken(self._due, limit):
            before = self._placed.pop(hive_id, {})
            placed: Placed = {}
            self._vram_due.pop(hive_id, None)
            if entry is not None and entry.schedulable:
                self._place(hive_id, entry, before, placed)
            for table, slot in before.values():
                table.release(slot)
            if entry is not None and placed:
                self._placed[hive_id] = placed
                self._vram_due[hive_id] = entry

    def _place(self, hive_id: str, entry: HiveView, before: Placed, placed: Placed) -> None:
        weights, devices = self.settings.weights, entry.capabilities
        degraded = {d.uuid for d in devices if not isinstance(d.health, Healthy)}
        received_at = entry.received_at
        received_wall = self.wall() - max(0.0, self.clock() - received_at)
        for worker, _, schedulable, idle in judged(entry.workers, devices, True, self.registry,
                                                   ordered=False):
            model, endpoint = worker.model, worker.endpoint
            if not schedulable or endpoint is None or model is None:
                continue
            key = (worker.group, worker.instance)
            found = before.pop(key, None)
            table = self._tables.get(model)
            if table is None:
                table = self._tables[model] = ModelTable(weights.in_flight)
            if found is not None and found[0] is table:
                slot = found[1]
                ref = table.refs[slot]
                if ref is None or ref.endpoint != endpoint:
                    ref = WorkerRef(hive_id, worker.group, worker.instance, endpoint)
            else:
                if found is not None:
                    found[0].release(found[1])
                ref = WorkerRef(hive_id, worker.group, worker.instance, endpoint)
                slot = table.take(ref)
            penalty = weights.degraded_gpu if degraded and unhealthy_gpus_of(
                worker, devices, degraded) else 0.0
            engine = worker.engine
            if engine is None:
                row = Row(penalty, math.nan, math.nan, math.nan, math.nan, float(idle),
                          -math.inf, received_at, penalty)
            else:
                kv = engine.kv_cache_pct
                base = (weights.waiting * engine.requests_waiting
                        + weights.running * engine.requests_running
                        + (weights.kv_cache * kv / 100 if kv is not None else 0.0) + penalty)
                row = Row(base, engine.requests_running, engine.requests_waiting,
                          math.nan if kv is None else kv, math.nan, float(idle),
                          min(engine.sampled_at.timestamp(), received_wall)  # a clock ahead
                          if engine.sampled_at else received_wall,
                          received_at, base)
            table.write(slot, ref, row)
            placed[key] = (table, slot)

    def _fill_vram(self, limit: int | None = None) -> None:
        """The free VRAM of the workers of every hive heard from since the last call (the
        first ``limit`` of them, when given), as ``/v1/workers`` computes it (``HiveVram``)."""
        for hive_id, entry in _taken(self._vram_due, limit):
            vram = HiveVram(entry.capabilities, entry.workers)
            placed = self._placed.get(hive_id, {})
            for worker in entry.workers:
                found = placed.get((worker.group, worker.instance))
                if found is not None:
                    figures = vram.of(worker)
                    found[0].columns[FREE_VRAM, found[1]] = (
                        math.nan if figures is None else figures.free_mb)

    # -- picking ------------------------------------------------------------------------

    def pick(self, query: WorkerQuery, n: int = 1) -> PickAnswer:
        """The ``n`` best candidates of ``query.model`` matching ``query``'s filters, best
        first; the first counts in flight. Raises PickUnavailable naming why none is offered."""
        model = query.model
        if model is None:
            raise ValueError("a pick needs a model")
        settings = self.settings
        with self._lock:
            self._apply_due()
            now = self.wall()
            self._expire(now)
            if query.min_free_vram_mb is not None and self._vram_due:
                self._fill_vram()
            table = self._tables.get(model)
            if table is None or not table.count:
                raise PickUnavailable(
                    f"no worker of model {model!r} can be picked: none is running with an "
                    f"endpoint on a schedulable hive")
            ranking = self._rank(table, query, now)
            rank, k = ranking.rank, min(n, ranking.offered)
            if k == 1:
                slots = [int(np.argmin(rank))]  # ties: the lowest slot, as below
            else:
                some = np.argpartition(rank, k - 1)[:k] if k < len(rank) else np.arange(len(rank))
                slots = some[np.lexsort((some, rank[some]))][:k].tolist()
            first, sequence = slots[0], next(self._sequence)
            table.add_pick(first, sequence, now)
            self._expiry.append((now + settings.in_flight_ttl_ms / 1000, table, first, sequence))
            picked = [self._answer(table, slot, bool(ranking.stale[slot]), now) for slot in slots]
        return PickAnswer(model=model, picked=picked, candidates=ranking.candidates,
                          skipped_stale=ranking.skipped, all_stale=ranking.all_stale)

    def _rank(self, table: ModelTable, query: WorkerQuery, now: float) -> Ranking:
        """What a pick orders a table's slots by: the score, a stale worker's saturated (or
        infinite when skipped), a slot that is free or fails a filter infinite."""
        settings, model = self.settings, query.model
        matched = _filters(table, query)
        stale = table.column(FIGURES_AT) < now - settings.stale_after_ms / 1000
        score = table.column(SCORE)
        if matched is None:  # free slots have no figures (stale) and an infinite score
            candidates = table.count
            stale_count = int(np.count_nonzero(stale)) - (table.high - table.count)
        else:
            matched &= np.isfinite(score)
            candidates = int(np.count_nonzero(matched))
            if not candidates:
                raise PickUnavailable(
                    f"none of the {table.count} pickable workers of model {model!r} matches "
                    f"the filters ({_described(query)})")
            stale_count = int(np.count_nonzero(stale & matched))
        ranking = Ranking(score, stale, candidates)
        if stale_count == candidates:
            ranking.all_stale = True
            if settings.all_stale == "unavailable":
                raise PickUnavailable(
                    f"every one of the {candidates} candidates of model {model!r} has figures "
                    f"older than pick.stale_after_ms ({settings.stale_after_ms:g} ms) or none "
                    f"(pick.all_stale: unavailable)")
        elif stale_count and settings.stale == "skip":
            ranking.rank, ranking.skipped = np.where(stale, np.inf, score), stale_count
        elif stale_count:
            ranking.rank = score + stale * SATURATED
        if matched is not None:
            ranking.rank = np.where(matched, ranking.rank, np.inf)
        return ranking

    def in_flight(self, model: str) -> dict[str, int]:
        """Picks in flight per worker id (``hive/group/instance``) of a model: for tests and
        diagnostics."""
        with self._lock:
            self._apply_due()
            self._expire(self.wall())
            table = self._tables.get(model)
            if table is None:
                return {}
            return {"/".join(table.refs[slot][:3]): table.in_flight(slot)  # type: ignore[index]
                    for slot in table.pending}

    def _answer(self, table: ModelTable, slot: int, stale: bool, now: float) -> PickedWorker:
        ref = table.refs[slot]
        assert ref is not None
        row = table.columns[:, slot].tolist()
        figures_at = row[FIGURES_AT]
        return PickedWorker(
            hive_id=ref.hive_id, group=ref.group, instance=ref.instance, endpoint=ref.endpoint,
            score=round(row[SCORE], 3), requests_running=_whole(row[RUNNING]),
            requests_waiting=_whole(row[WAITING]),
            kv_cache_pct=None if math.isnan(row[KV_CACHE]) else float(row[KV_CACHE]),
            in_flight=table.in_flight(slot),
            engine_age_ms=(round(max(0.0, now - figures_at) * 1000, 1)
                           if math.isfinite(figures_at) else None),
            heartbeat_age_ms=round(max(0.0, self.clock() - row[RECEIVED_AT]) * 1000, 1),
            stale=stale)

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, table, slot, sequence = expiry.popleft()
            table.end_picks(slot, 0, up_to=sequence)


def _taken(due: dict, limit: int | None) -> list:
    """The first ``limit`` items of ``due`` (all with None), taken out of it."""
    if limit is None or len(due) <= limit:
        items = list(due.items())
        due.clear()
        return items
    items = list(itertools.islice(due.items(), limit))
    for key, _ in items:
        del due[key]
    return items


def _filters(table: ModelTable, query: WorkerQuery) -> np.ndarray | None:
    """The slots matching ``query``'s conditions beside the model (a figure that is NaN,
    unknown, never does); None without any."""
    matched = table.column(IDLE) > 0 if query.idle else None
    for value, column, at_least in ((query.min_free_vram_mb, FREE_VRAM, True),
                                    (query.max_waiting, WAITING, False),
                                    (query.max_kv_cache_pct, KV_CACHE, False)):
        if value is not None:
            figures = table.column(column)
            passed = (figures >= value) if at_least else (figures <= value)
            matched = passed if matched is None else matched & passed
    return matched


def _described(query: WorkerQuery) -> str:
    conditions = {"idle": query.idle or None, "min_free_vram_mb": query.min_free_vram_mb,
                  "max_waiting": query.max_waiting, "max_kv_cache_pct": query.max_kv_cache_pct}
    return ", ".join(f"{name}={value:g}" if not isinstance(value, bool) else f"{name}=true"
                     for name, value in conditions.items() if value is not None)


def _whole(value: float) -> int | None:
    return None if math.isnan(value) else int(value)
