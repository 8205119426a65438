"""The fleet's totals for the stream's ``queen`` event (``QueenEvent`` and its ``FleetSummary``).

The dashboard's header shows them; at 10,000 workers adding them up in the browser on every
event is what made it stutter, and the queen has the fleet at hand every ``queen_interval_s``
anyway, so it adds them up once for every client.

At 10,000 eight-worker hives adding them up from scratch takes hundreds of milliseconds of the
event loop (a ``FleetWorker`` per worker, then the event's 80,000 worker ids), and every
heartbeat waits meanwhile. So ``FleetTotals`` keeps each hive's share (``HivePart``) and the
running totals of all shares, and follows the registry (``HiveRegistry.observe``): a change of a
hive only notes it, and the next summary takes the changes noted until then, with the hives'
order at that instant, and computes their shares in parts with a pause after each (a change
after that instant is noted for the event after). Once they are all applied the totals are those
of that instant, so an event describes the registry at one instant: the same event
``fleet_summary`` (the whole computation, kept as the reference the tests compare with) gives
for the registry as it was then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from operator import attrgetter
from typing import NamedTuple, Protocol

import msgspec
import trio

from ..config import RegistrySettings
from ..contract import (
    FleetSummary,
    FleetWorker,
    GpuDevice,
    Healthy,
    HiveInfo,
    QueenEvent,
    WorkerState,
    WorkerTelemetry,
    encode,
    utc_now,
)
from .scheduling import hive_schedulable, idle_workers

HIVES_PER_PART = 50
"""Changed hives whose shares are computed between two pauses (about 1.3 ms of eight workers
each on a loaded 2-core machine)."""
PART_PAUSE_S = 0.004
"""The pause after each part: the summary takes at most about a fifth of the loop while it runs
(at 5,000 hives, ~0.5 s for 100 parts). With a bare checkpoint between parts it took half the
loop or more for 80-125 ms every ``stream.queen_interval_s``, and at 5,000 channel hives the
heartbeats queued behind that burst set p99 (docs/scale.md)."""
CPU_UNIT = 1000
"""CPU % is summed in thousandths, as integers: the running totals add and take away shares
forever, and floats would drift (and the whole computation rounds the same way)."""


def fleet_summary(online: list[FleetWorker], workers_total: int,
                  gpus: Iterable[GpuDevice]) -> FleetSummary:
    """Totals over the ``online`` workers (not stale), with ``workers_total`` counting every
    worker held and ``gpus`` the online hives' GPUs."""
    models, states, busy, running, waiting, cpu, rss, vram = _worker_totals(
        [fleet_worker.worker for fleet_worker in online])
    gpu_count = unhealthy = 0
    for gpu in gpus:
        gpu_count += 1
        unhealthy += not isinstance(gpu.health, Healthy)
    return FleetSummary(workers_total=workers_total, workers_busy=busy,
                        requests_running=running, requests_waiting=waiting,
                        cpu_pct=round(cpu / CPU_UNIT, 1), rss_mb=rss, vram_mb=vram, gpus=gpu_count,
                        gpus_unhealthy=unhealthy, models=models, states=states)


def _worker_totals(workers: Iterable[WorkerTelemetry]
                   ) -> tuple[dict[str, int], dict[str, int], int, int, int, int, int, int]:
    """Workers per model and per state; then busy, running, waiting, CPU (``CPU_UNIT``), RSS
    and VRAM, summed."""
    models: dict[str, int] = {}
    by_state: dict[WorkerState, int] = {}
    busy = running = waiting = cpu = rss = vram = 0
    for worker in workers:
        model = worker.model
        if model is not None:
            models[model] = models.get(model, 0) + 1
        state = worker.state  # its .value once per state below: an enum's value is slow to read
        by_state[state] = by_state.get(state, 0) + 1
        cpu += round(worker.cpu_pct * CPU_UNIT)
        rss += worker.rss_mb
        vram += worker.vram_mb
        engine = worker.engine
        if engine is not None:
            running += engine.requests_running
            waiting += engine.requests_waiting
            busy += engine.requests_running > 0
    states = {state.value: n for state, n in by_state.items()}
    return models, states, busy, running, waiting, cpu, rss, vram


class HiveEntry(Protocol):
    """What the totals read of a registry entry (``registry._HiveEntry``)."""

    info: HiveInfo
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice]
    stale: bool

    @property
    def schedulable(self) -> bool: ...


class _Seen(NamedTuple):
    """A registry entry's figures as of one instant: the registry changes some of an entry in
    place (its ``stale`` flag, its workers), so an event in parts keeps what it read."""

    info: HiveInfo
    workers: list[WorkerTelemetry]
    capabilities: list[GpuDevice]
    stale: bool

    @property
    def schedulable(self) -> bool:
        return hive_schedulable(self.info, self.stale)


_COUNTS = ("workers", "online", "available", "hives_online", "hives_available", "busy",
           "running", "waiting", "cpu", "rss", "vram", "gpus", "unhealthy")
_ONLINE = _COUNTS.index("hives_online")
_IDS_JSON = attrgetter("ids_json")
_NO_IDS = b'"worker_ids":[]'


class HivePart:
    """One hive's share of the totals, as of one state of its registry entry: ``counts`` in
    the order of ``_COUNTS``, its online workers per model and per state, and their ids in the
    listings' order. What a fleet of similar hives repeats is shared: the ids are the hive's
    last share's while its workers are the same ones, and equal per-model and per-state counts
    are one dict (``shapes``), so a share costs about 1 KB at eight workers."""

    __slots__ = ("counts", "ids_json", "models", "states")

    def __init__(self, hive_id: str, entry: HiveEntry, settings: RegistrySettings,
                 last: HivePart | None, shapes: dict[tuple, dict[str, int]]) -> None:
        workers, devices = entry.workers, entry.capabilities
        if entry.stale:  # a stale hive's workers count in workers_total alone
            self.models = self.states = _NO_COUNTS
            self.ids_json = b""
            self.counts = (len(workers),) + (0,) * (len(_COUNTS) - 1)
            return
        schedulable = entry.schedulable
        available = len(idle_workers(workers, devices, schedulable, settings))
        models, states, busy, running, waiting, cpu, rss, vram = _worker_totals(workers)
        ids = msgspec.json.encode([f"{hive_id}/{group}/{instance}" for group, instance in sorted(
            [(w.group, w.instance) for w in workers])])[1:-1]  # b'"h/g/i","h/g/i"': one object
        self.ids_json = last.ids_json if last is not None and last.ids_json == ids else ids
        self.models, self.states = _shared(models, shapes), _shared(states, shapes)
        self.counts = (len(workers), len(workers), available, 1, int(schedulable), busy,
                       running, waiting, cpu, rss, vram, len(devices),
                       sum(not isinstance(d.health, Healthy) for d in devices))


_NO_COUNTS: dict[str, int] = {}
_NOTHING = HivePart.__new__(HivePart)
_NOTHING.counts, _NOTHING.ids_json = (0,) * len(_COUNTS), b""
_NOTHING.models = _NOTHING.states = _NO_COUNTS
SHAPES_KEPT = 4096
"""Distinct count dicts ``_shared`` keeps (then it starts again): a fleet has a few."""


def _shared(counts: dict[str, int], shapes: dict[tuple, dict[str, int]]) -> dict[str, int]:
    """One dict for every equal ``counts`` (never mutated once shared)."""
    key = tuple(counts.items())
    found = shapes.get(key)
    if found is None:
        if len(shapes) >= SHAPES_KEPT:
            shapes.clear()
        found = shapes[key] = counts
    return found


class FleetTotals:
    """The ``queen`` event of a registry, kept by following its changes (see the module's
    docstring). ``order()`` gives the hive ids in id order (the registry's ``hive_ids``): the
    event lists hives and workers in that order, as ``/v1/workers`` does."""

    def __init__(self, settings: RegistrySettings, order: Callable[[], list[str]]) -> None:
        self.settings, self.order = settings, order
        self._parts: dict[str, HivePart] = {}
        self._due: dict[str, HiveEntry | None] = {}
        self._sums = [0] * len(_COUNTS)
        self._models: dict[str, int] = {}
        self._states: dict[str, int] = {}
        self._shapes: dict[tuple, dict[str, int]] = {}
        self._offline: set[str] = set()
        """Hives held whose share is not online (stale): the event lists the others."""

    def hive_changed(self, hive_id: str, entry: HiveEntry | None) -> None:
        """The registry's observer: a hive's new state (``None``: removed), noted only."""
        self._due[hive_id] = entry

    async def event(self) -> bytes:
        """The ``queen`` event's JSON as of the instant it is asked for: the hives changed until
        then are taken from the noted ones (a change after it is noted for the next event) with
        the hive order of that instant, their shares computed in parts of ``HIVES_PER_PART``
        with a pause of ``PART_PAUSE_S`` after each, then the event's figures, and its JSON after
        one more checkpoint. One runs at a time (the store's summary loop)."""
        noted, order, at = self._begin()
        while noted:
            self._apply(HIVES_PER_PART, noted)
            if noted:
                await trio.sleep(PART_PAUSE_S)
        event, ids = self._taken(order, at)
        await trio.lowlevel.checkpoint()
        return _json(event, ids)

    def _begin(self) -> tuple[dict[str, HiveEntry | None], list[str], datetime]:
        """The instant an event describes: the changes noted until now (from now on noted
        apart), each as the entry reads now (``_Seen``; one pass, ~2 ms at 5,000 hives), the
        hives' order, and the time."""
        due, self._due = self._due, {}
        noted: dict[str, HiveEntry | None] = {hive_id: None if entry is None else _Seen(
            entry.info, entry.workers, entry.capabilities, entry.stale)
            for hive_id, entry in due.items()}
        return noted, self.order(), utc_now()

    def event_now(self) -> bytes:
        """The ``queen`` event's JSON as of now, every noted change applied in one go (not while
        ``event`` runs: its changes, taken out of the noted ones, would be applied after)."""
        self._apply(None, self._due)
        return _json(*self._taken(self.order(), utc_now()))

    def _taken(self, order: list[str], at: datetime) -> tuple[QueenEvent, list[bytes]]:
        """The event's figures from the shares applied: the event without its ``worker_ids``,
        and the online hives' ids as JSON (bytes, never changed: the JSON made from them later
        is still this instant's). ``order`` and ``at``: the hive ids and the time as of the
        instant described."""
        (workers, online, available, hives_online, hives_available, busy, running, waiting, cpu,
         rss, vram, gpus, unhealthy) = self._sums
        for counts in (self._models, self._states):
            for gone in [key for key, n in counts.items() if not n]:
                del counts[gone]
        offline = self._offline
        hive_ids = [h for h in order if h not in offline] if offline else order
        summary = FleetSummary(
            workers_total=workers, workers_busy=busy, requests_running=running,
            requests_waiting=waiting, cpu_pct=round(cpu / CPU_UNIT, 1), rss_mb=rss,
            vram_mb=vram, gpus=gpus, gpus_unhealthy=unhealthy, models=dict(self._models),
            states=dict(self._states))
        event = QueenEvent(
            workers_online=online, workers_available=available, hives_online=hives_online,
            hives_available=hives_available, worker_ids=[], hive_ids=hive_ids,
            timestamp=at, summary=summary)
        return event, list(filter(None, map(_IDS_JSON, map(self._parts.__getitem__, hive_ids))))

    def _apply(self, limit: int | None, due: dict[str, HiveEntry | None]) -> None:
        """The shares of the first ``limit`` hives of ``due`` (all with None), in the order
        noted, taken out of it."""
        noted = list(due.items() if limit is None else islice(due.items(), limit))
        if limit is None:
            due.clear()
        else:
            for hive_id, _ in noted:
                del due[hive_id]
        parts, settings = self._parts, self.settings
        models, states = self._models, self._states
        news: list[tuple[int, ...]] = []
        olds: list[tuple[int, ...]] = []
        for hive_id, entry in noted:
            old = parts.pop(hive_id, None)
            if entry is None:
                new = _NOTHING
                self._offline.discard(hive_id)
            else:
                new = parts[hive_id] = HivePart(hive_id, entry, settings, old, self._shapes)
                (self._offline.discard if new.counts[_ONLINE] else self._offline.add)(hive_id)
            if old is None:
                old = _NOTHING
            news.append(new.counts)
            olds.append(old.counts)
            for totals, was, now in ((models, old.models, new.models),
                                     (states, old.states, new.states)):
                if was is now:  # the same shared dict (``_shared``): nothing moves
                    continue
                for key, n in was.items():
                    totals[key] -= n
                for key, n in now.items():
                    totals[key] = totals.get(key, 0) + n
        if noted:  # the part's counts summed column by column
            self._sums = [total + n - o for total, n, o in zip(
                self._sums, map(sum, zip(*news, strict=True)),
                map(sum, zip(*olds, strict=True)), strict=True)]


def _json(event: QueenEvent, ids: list[bytes]) -> bytes:
    """``event``'s JSON with ``ids`` as its ``worker_ids``: the hives' JSON joined (80,000
    workers: 2.4 MB, ~1 ms), never a list of strings: nothing but the encoder reads them (the
    stream passes a ``queen`` event whole, ``broadcast.Group``)."""
    data = encode(event)
    # the first '"worker_ids":[]' is the field: inside a string a quote is escaped (\")
    at = data.index(_NO_IDS)
    return b"".join((data[:at], b'"worker_ids":[', b",".join(ids),
                     data[at + len(_NO_IDS) - 1:]))
