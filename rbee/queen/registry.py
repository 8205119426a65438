"""The queen's fleet registry: every hive, its workers and GPUs, and the scheduling queries over them.

A hive's record is replaced whole by each heartbeat (never merged), so a worker that is gone from
the hive is gone from the registry at the next heartbeat. Silence is judged by the queen's own
monotonic clock at receipt, never by the hive's timestamp, which may be wrong. A silent hive goes
through two steps: *stale* (still listed, no longer scheduled) and then *removed* with all its
workers. If most of the fleet falls silent at once the fault is more likely on the queen's side
(its network, a stall), so nothing is removed until that clears, as Kubernetes' node lifecycle
controller and Nomad's heartbeat grace do. That guard counts and holds only *established* hives,
those that reported over at least ``established_after_s``: a burst of ids posted once and never
again must not outnumber the real fleet and so stop every removal for good.

Hostile load is bounded at the door: at most ``max_hives`` hives, and hives the registry does not
know yet are admitted at ``new_hives_per_s`` (a token bucket of ``new_hives_burst``); a known hive
is never refused. Listing workers costs what it returns: hive ids are kept sorted, so a page
(``limit`` workers after a cursor, the last worker id of the previous page) starts with a bisection
and stops when it is full, and filters are tested worker by worker without building the fleet.

Every method takes one lock and returns fresh lists, so trio tasks and threads may read and write
concurrently; the structs inside are never mutated after they are stored.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from .._errors import AdmissionError, NotFoundError
from ..config import RegistrySettings
from ..contract import (
    FleetWorker,
    GpuDevice,
    HiveHeartbeat,
    HiveInfo,
    HiveRecord,
    HiveRemovedEvent,
    HiveStaleEvent,
    HiveState,
    QueenEvent,
    SnapshotEvent,
    WorkerPage,
    WorkerTelemetry,
    utc_now,
    worker_id,
)
from .scheduling import (
    EVERY_WORKER,
    HiveVram,
    WorkerQuery,
    fleet_key,
    hive_schedulable,
    instance_key,
    judged,
    parse_worker_id,
)
from .sharing import SharedText
from .silence import SilenceBook
from .summary import fleet_summary

log = logging.getLogger(__name__)

class _AdmissionBucket:
    """A token bucket: ``burst`` new hives at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), now

    def take(self, now: float) -> float:
        """0 if a token was taken; else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(slots=True)
class _HiveEntry:
    info: HiveInfo
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice]
    last_heartbeat: datetime
    received_at: float
    first_seen: float
    """When this hive's current stay began (the queen's clock): it is established once it has
    reported over ``established_after_s`` since."""
    stale: bool = False
    established: bool = False
    """Whether it had reported over ``established_after_s`` when last heard from
    (``silence.SilenceBook`` keeps it)."""
    listed: tuple[tuple[bool, bool], list[FleetWorker]] | None = None
    """The workers as listings show them, in id order, made by the first listing after this
    heartbeat and kept while ``stale`` and ``skip_unhealthy_gpus`` are what they were then
    (under the key), the entry being otherwise immutable:
    readers looping on ``/v1/workers`` pay the VRAM arithmetic once per heartbeat, not per read."""

    @property
    def schedulable(self) -> bool:
        return hive_schedulable(self.info, self.stale)


@dataclass(slots=True)
class SweepResult:
    """What one stale-cleanup pass changed; the queen announces each event on the stream."""

    stale: list[HiveStaleEvent] = field(default_factory=list)
    removed: list[HiveRemovedEvent] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    """Hives silent past ``remove_after_s`` but kept by the mass-silence guard."""


class HiveRegistry:
    def __init__(self, settings: RegistrySettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or RegistrySettings()
        self._clock = clock
        self._hives: dict[str, _HiveEntry] = {}
        self._order: list[str] = []
        """The hive ids, sorted: pages start by bisection instead of sorting the fleet."""
        self._admission = _AdmissionBucket(self.settings.new_hives_per_s,
                                           self.settings.new_hives_burst, clock())
        self._lock = threading.Lock()
        self._silences = SilenceBook(self.settings)
        self._texts = SharedText()
        self._observers: list[Callable[[str, _HiveEntry | None], None]] = []

    def observe(self, observer: Callable[[str, _HiveEntry | None], None]) -> None:
        """Have ``observer(hive_id, entry)`` called, under the lock, for every hive known now and
        after each change of one (``None``: removed), so an index kept beside the registry (the
        pick's, ``rbee/queen/pick``) follows the fleet without scanning it. It must not block."""
        with self._lock:
            self._observers.append(observer)
            for hive_id, entry in self._hives.items():
                observer(hive_id, entry)

    def _changed(self, hive_id: str, entry: _HiveEntry | None) -> None:
        for observer in self._observers:
            observer(hive_id, entry)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock ``received_at`` (and silence) is measured on."""
        return self._clock

    # -- writing ---------------------------------------------------------------------------

    def update_hive(self, heartbeat: HiveHeartbeat, received_at: float | None = None, *,
                    stale: bool = False, admit: bool = True) -> None:
        """Store a heartbeat: the hive's info, workers and GPUs replace what was there.
        ``received_at`` (on the registry's clock) is now unless given: a queen that mirrors a
        shared store passes the time the store received it, and ``admit=False`` since the
        queen that took the heartbeat admitted the hive.

        Raises AdmissionError for a hive not known yet while the registry holds ``max_hives``
        or new hives arrive faster than ``new_hives_per_s``; a known hive is always stored."""
        hive_id = heartbeat.hive.id
        now = self._clock() if received_at is None else received_at
        known = self._hives.get(hive_id)
        # before anything reads it, so all see the shared objects
        self._texts.share(heartbeat, () if known is None else known.capabilities)
        # the heartbeat's own lists, not copies: like the structs in them, never mutated once
        # stored (the stream's event holds the same ones)
        entry = _HiveEntry(info=heartbeat.hive, workers=heartbeat.workers,
                           capabilities=heartbeat.capabilities,
                           last_heartbeat=heartbeat.timestamp, received_at=now, first_seen=now,
                           stale=stale)
        with self._lock:
            known = self._hives.get(hive_id)  # again: another thread may have written meanwhile
            if known is None:
                if admit:
                    self._admit(hive_id, self._clock())
                insort(self._order, hive_id)
            else:
                entry.first_seen = known.first_seen
            self._hives[hive_id] = entry
            self._silences.reported(hive_id, entry, known)
            self._changed(hive_id, entry)

    def admit(self, hive_id: str) -> None:
        """Admit a hive before its heartbeat is stored elsewhere (a shared store): nothing for
        a known hive, else AdmissionError as ``update_hive`` raises it."""
        with self._lock:
            if hive_id not in self._hives:
                self._admit(hive_id, self._clock())

    def mark_stale(self, hive_id: str) -> None:
        """Flag a hive stale as another queen's sweep judged it (until its next heartbeat)."""
        with self._lock:
            entry = self._hives.get(hive_id)
            if entry is not None:
                entry.stale = True
                self._silences.flag(hive_id, True)
                self._changed(hive_id, entry)

    def clear(self) -> None:
        """Forget every hive (a mirror about to reload the shared store)."""
        with self._lock:
            for hive_id in self._order:
                self._changed(hive_id, None)
            self._hives.clear()
            self._order.clear()
            self._silences.clear()

    def update_workers(self, hive_id: str, workers: list[WorkerTelemetry]) -> None:
        """Replace a known hive's workers (never appends). Raises NotFoundError for a hive that
        never sent a heartbeat: a worker list without its hive has nowhere to belong."""
        with self._lock:
            entry = self._entry(hive_id)
            entry.workers, entry.listed = list(workers), None
            self._changed(hive_id, entry)

    def remove_hive(self, hive_id: str, reason: str = "removed") -> HiveRemovedEvent | None:
        with self._lock:
            entry = self._pop(hive_id)
        return None if entry is None else _removed(hive_id, entry, reason)

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._hives)

    def counts(self) -> tuple[int, int]:
        """Hives and their workers (stale hives included), as ``records`` would count them."""
        with self._lock:
            return len(self._hives), sum(len(e.workers) for e in self._hives.values())

    def hive_ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def knows(self, hive_id: str) -> bool:
        with self._lock:
            return hive_id in self._hives

    def get_hive(self, hive_id: str) -> HiveState:
        """One hive as a snapshot shows it. Raises NotFoundError naming an unknown hive."""
        now = self._clock()
        with self._lock:
            return self._state(hive_id, self._entry(hive_id), now)

    def hives(self) -> list[HiveState]:
        now = self._clock()
        with self._lock:
            return [self._state(hive_id, self._hives[hive_id], now) for hive_id in self._order]

    def hives_page(self, *, after: str | None = None, limit: int) -> tuple[list[HiveState],
                                                                          str | None]:
        """Up to ``limit`` hives whose id sorts after ``after``, in id order, and the next page's
        cursor (the last id here) when this page is full; found by bisection."""
        now = self._clock()
        with self._lock:
            first = bisect_right(self._order, after) if after is not None else 0
            ids = self._order[first:first + limit]
            page = [self._state(hive_id, self._hives[hive_id], now) for hive_id in ids]
        return page, (ids[-1] if len(ids) == limit else None)

    def get_workers(self, hive_id: str) -> list[WorkerTelemetry]:
        """A hive's workers as last reported; empty for a hive the registry does not know."""
        with self._lock:
            entry = self._hives.get(hive_id)
            return list(entry.workers) if entry is not None else []

    def records(self) -> list[HiveRecord]:
        """Every hive as a scrape reads it: the stored structs themselves (never mutated), so
        the lock is held only to copy the list."""
        now = self._clock()
        with self._lock:
            return [HiveRecord(info=e.info, workers=e.workers, gpus=e.capabilities, stale=e.stale,
                               silent_s=round(max(0.0, now - e.received_at), 3))
                    for e in self._hives.values()]

    def get_all_workers(self) -> list[FleetWorker]:
        """Every worker of every hive, stale hives included (flagged), flattened."""
        return self.workers_page().workers

    def workers_page(self, query: WorkerQuery = EVERY_WORKER, *, after: str | None = None,
                     limit: int | None = None) -> WorkerPage:
        """Up to ``limit`` workers matching ``query`` whose id sorts after ``after`` (a worker id,
        the previous page's ``next_after``), in id order. The cost is the hives visited: from
        the cursor's hive on, until the page is full. Raises ValueError for a malformed
        ``after``."""
        start = parse_worker_id(after) if after is not None else None
        found: list[FleetWorker] = []
        with self._lock:
            order = self._order
            first = bisect_left(order, start[0]) if start is not None else 0
            for index in range(first, len(order)):
                hive_id = order[index]
                for worker in self._hive_workers(hive_id, self._hives[hive_id],
                                                 after=start if index == first else None):
                    if query.matches(worker):
                        found.append(worker)
                        if limit is not None and len(found) >= limit:
                            return WorkerPage(workers=found, next_after=worker.id)
        return WorkerPage(workers=found, next_after=None)

    def snapshot(self) -> SnapshotEvent:
        return SnapshotEvent(hives=self.hives(), timestamp=utc_now())

    def summary(self) -> QueenEvent:
        """Counts for the stream's ``queen`` event: online is not stale, available is
        schedulable (for workers: also idle)."""
        with self._lock:
            online = [w for hive_id in self._order
                      for w in self._hive_workers(hive_id, self._hives[hive_id], with_vram=False)
                      if not w.hive_stale]
            hives_online = sorted(h for h, e in self._hives.items() if not e.stale)
            hives_available = sum(1 for e in self._hives.values() if e.schedulable)
            totals = fleet_summary(online, sum(len(e.workers) for e in self._hives.values()),
                                   [g for e in self._hives.values() if not e.stale
                                    for g in e.capabilities])
        return QueenEvent(
            workers_online=len(online),
            workers_available=sum(1 for w in online if w.idle),
            hives_online=len(hives_online), hives_available=hives_available,
            worker_ids=[w.id for w in online], hive_ids=hives_online, timestamp=utc_now(),
            summary=totals)

    # -- scheduling queries ----------------------------------------------------------------

    def find_workers(self, *, idle: bool = False, model: str | None = None,
                     min_free_vram_mb: float | None = None, max_waiting: int | None = None,
                     max_kv_cache_pct: float | None = None) -> list[FleetWorker]:
        """Schedulable workers matching every given condition (``WorkerQuery``), all of them."""
        query = WorkerQuery(idle=idle, model=model, min_free_vram_mb=min_free_vram_mb,
                            max_waiting=max_waiting, max_kv_cache_pct=max_kv_cache_pct)
        if not query.filtered:  # no condition still means schedulable workers only
            return [w for w in self.get_all_workers() if w.schedulable]
        return self.workers_page(query).workers

    def find_idle_workers(self) -> list[FleetWorker]:
        """Idle workers (``is_idle``): no request in their engine, else a GPU at or under
        ``idle_gpu_util_pct``."""
        return self.find_workers(idle=True)

    def find_workers_with_model(self, model: str) -> list[FleetWorker]:
        return self.find_workers(model=model)

    def find_workers_with_capacity(self, vram_mb: float) -> list[FleetWorker]:
        """Workers whose GPU(s) have at least ``vram_mb`` MiB free, as the driver measures it on
        the real device (never an assumed card size)."""
        return self.find_workers(min_free_vram_mb=vram_mb)

    # -- stale cleanup ---------------------------------------------------------------------

    def sweep(self) -> SweepResult:
        """Mark silent hives stale and remove those silent past ``remove_after_s``.

        Called by the queen's cleanup task every ``cleanup_interval_s``; after a stall, silences
        restart (``silence.StallRule``). Costs what is silent (``silence.SilenceBook``)."""
        settings = self.settings
        result = SweepResult()
        now = self._clock()
        with self._lock:
            verdict, silent, flipped = self._silences.sweep(self._hives, now)
            result.held = verdict.held
            for hive_id in verdict.newly_stale:
                result.stale.append(HiveStaleEvent(
                    hive_id=hive_id, silent_s=round(silent[hive_id], 3), timestamp=utc_now()))
            for hive_id in flipped:
                self._changed(hive_id, self._hives[hive_id])
            for hive_id in verdict.expired:
                result.removed.append(_removed(
                    hive_id, self._pop(hive_id),
                    f"no heartbeat for {silent[hive_id]:.1f}s "
                    f"(remove_after_s: {settings.remove_after_s:g})"))
        return result

    # -- internals (callers hold the lock) -------------------------------------------------

    def _admit(self, hive_id: str, now: float) -> None:
        settings = self.settings
        if len(self._hives) >= settings.max_hives:
            raise AdmissionError(
                f"hive {hive_id!r} refused: the registry is full "
                f"(registry.max_hives: {settings.max_hives})", hive_id=hive_id)
        wait = self._admission.take(now)
        if wait:
            raise AdmissionError(
                f"hive {hive_id!r} refused for now: new hives are admitted at most "
                f"{settings.new_hives_per_s:g}/s (registry.new_hives_per_s, burst "
                f"{settings.new_hives_burst}); retry in {wait:.2f}s",
                hive_id=hive_id, retry_after_s=wait)

    def _pop(self, hive_id: str) -> _HiveEntry | None:
        entry = self._hives.pop(hive_id, None)
        if entry is not None:
            del self._order[bisect_left(self._order, hive_id)]
            self._silences.forgot(hive_id, entry)
            self._changed(hive_id, None)
        return entry

    def _entry(self, hive_id: str) -> _HiveEntry:
        try:
            return self._hives[hive_id]
        except KeyError:
            raise NotFoundError(f"unknown hive {hive_id!r}") from None

    def _state(self, hive_id: str, entry: _HiveEntry, now: float) -> HiveState:
        return HiveState(hive=entry.info, stale=entry.stale,
                         silent_s=round(max(0.0, now - entry.received_at), 3),
                         last_heartbeat=entry.last_heartbeat, workers=list(entry.workers),
                         capabilities=list(entry.capabilities),
                         idle=[instance_key(w.worker) for w in self._hive_workers(
                             hive_id, entry, with_vram=False) if w.idle])

    def _hive_workers(self, hive_id: str, entry: _HiveEntry, *, with_vram: bool = True,
                      after: tuple[str, str, str] | None = None) -> Iterator[FleetWorker]:
        """One hive's workers in (group, instance) order, those up to ``after`` skipped."""
        key = (entry.stale, self.settings.skip_unhealthy_gpus)
        if with_vram and entry.listed is not None and entry.listed[0] == key:
            listed = entry.listed[1]
        else:
            listed = list(self._list_workers(hive_id, entry, with_vram=with_vram))
            if with_vram:
                entry.listed = (key, listed)
        if after is not None and after[0] == hive_id:
            return iter(listed[bisect_right(listed, after[1:], key=fleet_key):])
        return iter(listed if after is None or after[0] < hive_id else ())

    def _list_workers(self, hive_id: str, entry: _HiveEntry, *,
                      with_vram: bool) -> Iterator[FleetWorker]:
        vram = HiveVram(entry.capabilities, entry.workers) if with_vram else None
        for worker, on_unhealthy, schedulable, idle in judged(
                entry.workers, entry.capabilities, entry.schedulable, self.settings):
            yield FleetWorker(
                hive_id=hive_id, hive_stale=entry.stale, schedulable=schedulable, idle=idle,
                worker=worker, vram=vram.of(worker) if vram is not None else None,
                unhealthy_gpus=on_unhealthy)


def _removed(hive_id: str, entry: _HiveEntry, reason: str) -> HiveRemovedEvent:
    return HiveRemovedEvent(hive_id=hive_id, reason=reason, timestamp=utc_now(),
                            worker_ids=[worker_id(hive_id, w) for w in entry.workers])
