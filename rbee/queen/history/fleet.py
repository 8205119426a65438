"""The fleet's history: which rows belong to which hive, and one step of recording.

Each hive the queen records has a ``HiveRows``: the first row of each of its workers' series
and of each GPU's (rows handed out once, when a worker or GPU is first seen, and kept while it
is), and the destination of every figure of its heartbeat in order (``worker_dest``,
``gpu_dest``). Ingest pays one dict write per heartbeat: the registry calls ``hive_changed``
(its observer) and the hive is noted as pending. A step gathers only the hives noted since the
last one: their workers and GPUs are read in one batch per chunk (``figures``), their values
land in the store's ``current`` column with one fancy-index write, and every store's fine tier
takes ``current`` as its new column. A hive that goes stale or leaves the registry has its rows
set to NaN once. No step scans the fleet.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from itertools import chain
from operator import attrgetter

import numpy as np

from ...config import HistorySettings
from ...contract import GpuDevice, HistoryAnswer, HiveRecord, WorkerTelemetry
from .columns import Budget, Codec, Store
from .figures import Figures, labels, plugin_figures, worker_key
from .hives import NO_ROWS, HiveRows
from .reading import Selector, answer

_LAYOUT = (attrgetter("groups"), attrgetter("instances"), attrgetter("uuids"),
           attrgetter("indices"))
"""What a hive's rows were laid out for, in the order ``figures.labels`` reads it."""
HIVES_PER_CHUNK = 100
NOTES_PER_PART = 1000
"""Noted hives sorted into gathered, silenced and skipped between two checkpoints (under 1 ms)."""
"""Hives gathered between two checkpoints of the recording task (about 1 ms of work at eight
workers and eight GPUs a hive), so heartbeats are answered between the parts."""

Noted = tuple[list[WorkerTelemetry], list[GpuDevice], bool] | None
"""What a hive's last change left to record: its workers, its GPUs, whether it is stale; None:
it left the registry."""
Changed = tuple[HiveRows, list[WorkerTelemetry], list[GpuDevice]]


class FleetHistory:
    """The built-in history of every worker's and GPU's figures (see ``docs/history.md``)."""

    def __init__(self, settings: HistorySettings | None = None) -> None:
        self.settings = s = settings or HistorySettings()
        self.figures = Figures(s)
        self.worker_metrics, self.gpu_metrics = self.figures.worker, self.figures.gpu
        """The series kept of a worker and of a GPU, in the order of their rows."""
        self.per_bucket = round(s.coarse_step_s / s.fine_step_s)
        """Fine points per coarse point."""
        self.fine_slots = max(int(s.fine_retention_s // s.fine_step_s), self.per_bucket)
        """At least a coarse interval's worth: a coarse point is the mean of fine ones."""
        self.coarse_slots = int(s.coarse_retention_s // s.coarse_step_s)
        self.budget = Budget(s.max_bytes)
        self.values = Store(Codec(np.float16), self.fine_slots, self.coarse_slots, self.budget)
        self.plugins = Store(Codec(np.float32), self.fine_slots, self.coarse_slots, self.budget)
        self.hives: dict[str, HiveRows] = {}
        self.plugin_metrics: dict[str, int] = {}
        """Plugin figures held, by name: how many series of each."""
        self.refused = 0
        """Series not recorded because ``history.max_bytes`` was reached (a counter)."""
        self.series = 0
        """Series held (of each worker and GPU, whether each figure is known or not)."""
        self._pending: dict[str, Noted] = {}
        """The hives changed since the last step, as they are now (under ``_noting``: the
        registry may be written from threads)."""
        self._new: set[str] = set()
        """Those of them the history holds nothing of yet (recorded at the next tick)."""
        self._noting = threading.Lock()
        self._index = -1
        """The fine step written last."""
        self._closed = -1
        self._released = 0
        """Runs of rows freed so far: a hive refused whole is laid out again once it moved."""
        self._plugin_hives = 0
        """Hives holding plugin series (while none does, workers' figures are only tested for
        being empty, in one pass)."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.series

    def metrics(self) -> frozenset[str]:
        """Every metric a query may name: the built-in ones kept and the plugin figures held."""
        return self.figures.metrics().union(self.plugin_metrics)

    # -- recording -------------------------------------------------------------------------

    def hive_changed(self, hive_id: str, entry) -> None:
        """The registry's observer (``HiveRegistry.observe``), called at each heartbeat, stale
        verdict and removal: the hive is noted for the next step, and nothing else is done (an
        entry has ``workers``, ``capabilities`` and ``stale``; None: removed)."""
        noted = None if entry is None else (entry.workers, entry.capabilities, entry.stale)
        with self._noting:
            self._pending[hive_id] = noted
            if hive_id not in self.hives:
                self._new.add(hive_id)

    def take_fleet(self, hives: Iterable[HiveRecord]) -> None:
        """Note a whole listing of the fleet: each hive in it as it is, the hives held but not
        listed as gone (what a queen without the observer, or a test, records from)."""
        listed = {record.info.id: (record.workers, record.gpus, record.stale) for record in hives}
        listed.update((hive_id, None) for hive_id, rows in self.hives.items()
                      if rows.live and hive_id not in listed)
        with self._noting:
            self._pending.update(listed)
            self._new.update(hive_id for hive_id in listed if hive_id not in self.hives)

    def record(self, hives: Iterable[HiveRecord], now: float) -> None:
        """One point of every figure of every hive of ``hives`` (the whole fleet), at ``now``
        (Unix time)."""
        self.take_fleet(hives)
        for _ in self.recording(now):
            pass

    def recording(self, now: float) -> Iterator[None]:
        """Record the hives noted since the last step, at ``now``, in parts: it yields between
        them, where the caller may let other tasks run (a queen of 10,000 hives gathers in
        chunks of ``HIVES_PER_CHUNK``). Within a fine step already written, only the hives seen
        for the first time are recorded (into that step's point): a new hive shows at once,
        the others wait for the next step."""
        index = int(now // self.settings.fine_step_s)
        if index <= self._index:
            yield from self._first_sight(index, now)
            return
        with self._noting:
            pending, self._pending = self._pending, {}
            self._new.clear()
        yield from self._gathering(list(pending.items()), now)
        bucket = index // self.per_bucket
        if self._closed < 0:
            self._closed = bucket - 1
        oldest = (index - self.fine_slots) // self.per_bucket  # before it, no fine point is left
        for closing in range(max(self._closed + 1, oldest), bucket):
            first = closing * self.per_bucket
            for store in (self.values, self.plugins):
                yield from self._locked(store.closing(closing, first,
                                                      first + self.per_bucket - 1))
        self._closed = max(self._closed, bucket - 1)
        with self._lock:
            self.values.step(index)
            self.plugins.step(index)
            self._index = index

    def _first_sight(self, index: int, now: float) -> Iterator[None]:
        with self._noting:
            fresh, self._new = self._new, set()
            new = {hive_id: self._pending.pop(hive_id) for hive_id in fresh
                   if hive_id in self._pending and hive_id not in self.hives}
        if not new:
            return
        yield from self._gathering(list(new.items()), now)  # stale or gone meanwhile: nothing
        with self._lock:
            self.values.step(index)  # the step's point again, the new hives' values in it
            self.plugins.step(index)

    def _gathering(self, notes: list[tuple[str, Noted]], now: float) -> Iterator[None]:
        """The noted hives sorted (``NOTES_PER_PART`` a part), then gathered
        (``HIVES_PER_CHUNK`` a part)."""
        changed: list[Changed] = []
        for start in range(0, len(notes), NOTES_PER_PART):
            changed += self._changed(notes[start:start + NOTES_PER_PART], now)
            yield
        for start in range(0, len(changed), HIVES_PER_CHUNK):
            with self._lock:
                self._gather(changed[start:start + HIVES_PER_CHUNK], now)
            yield

    def _locked(self, parts: Iterator[None]) -> Iterator[None]:
        """Each of ``parts`` run under the lock, a yield after each."""
        while True:
            with self._lock:
                try:
                    next(parts)
                except StopIteration:
                    return
            yield

    def _changed(self, notes: list[tuple[str, Noted]], now: float) -> list[Changed]:
        """The hives of ``notes`` to gather (all but those refused whole by the budget); stale
        and vanished ones are silenced. Nothing of a heartbeat is kept once gathered: a
        reference would keep the hive's previous structs alive beside the registry's."""
        changed = []
        hives = self.hives
        with self._lock:
            for hive_id, noted in notes:
                rows = hives.get(hive_id)
                if noted is None or noted[2]:  # gone, or stale
                    if rows is not None and rows.live:
                        self._silence(rows)
                    continue
                if rows is None:
                    rows = hives[hive_id] = HiveRows()
                rows.seen_at = now
                workers, gpus, _ = noted
                if rows.refused_at >= 0:  # some of its series did not fit
                    if rows.refused_at != self._released:
                        rows.groups = rows.uuids = ()  # rows were freed since: lay it out
                    elif rows.refused_whole:
                        continue  # nothing of it fits, and nothing was freed since
                changed.append((rows, workers, gpus))
        return changed

    def _silence(self, rows: HiveRows) -> None:
        rows.live = False
        self.values.current[rows.worker_dest] = 0
        self.values.current[rows.gpu_dest] = 0
        for figures in rows.plugin_rows.values():
            self.plugins.current[list(figures.values())] = 0

    def _gather(self, changed: list[Changed], now: float) -> None:
        with_gpus = bool(self.gpu_metrics)  # no GPU series kept: GPUs are not even laid out
        workers = list(chain.from_iterable(w for _, w, _ in changed))
        gpus = list(chain.from_iterable(g for _, _, g in changed)) if with_gpus else []
        seen = labels(workers, gpus)  # lists of strings: no tuple made per worker or GPU
        laid_out = tuple(list(chain.from_iterable(map(getter, (rows for rows, _, _ in changed))))
                         for getter in _LAYOUT)
        if seen != laid_out:
            self._lay_out_changed(changed, seen, now)  # some hive's workers or GPUs moved
        for rows, _, _ in changed:
            rows.live = True
        if self._plugin_hives or any(map(plugin_figures, workers)):
            for rows, hive_workers, _ in changed:
                if rows.plugin_rows or any(map(plugin_figures, hive_workers)):
                    self._gather_plugin_figures(rows, hive_workers)
        codec, current = self.values.codec, self.values.current
        if workers and self.worker_metrics:
            dest = np.concatenate([rows.worker_dest for rows, _, _ in changed])
            current[dest] = codec.encode(self.figures.worker_values(workers)).ravel()
        if gpus:
            dest = np.concatenate([rows.gpu_dest for rows, _, _ in changed])
            current[dest] = codec.encode(self.figures.gpu_values(gpus)).ravel()

    def _lay_out_changed(self, changed: list[Changed], seen: tuple[list, ...], now: float
                         ) -> None:
        """Lay out again each hive whose workers or GPUs are not those of its last heartbeat."""
        groups, instances, uuids, indices = seen
        w = g = 0
        with_gpus = bool(self.gpu_metrics)
        for rows, workers, gpus in changed:
            w_end, g_end = w + len(workers), g + (len(gpus) if with_gpus else 0)
            hive = (tuple(groups[w:w_end]), tuple(instances[w:w_end]), tuple(uuids[g:g_end]),
                    tuple(indices[g:g_end]))
            if hive != tuple(getter(rows) for getter in _LAYOUT):
                self._lay_out(rows, *hive, now)
            w, g = w_end, g_end

    def _lay_out(self, rows: HiveRows, groups: tuple, instances: tuple, uuids: tuple,
                 indices: tuple, now: float) -> None:
        """Rows for the workers and GPUs now reported (new ones get theirs); those no longer
        reported become NaN and idle (kept until ``forget_old``)."""
        per_worker, per_gpu = len(self.worker_metrics), len(self.gpu_metrics)
        keys = tuple(zip(groups, instances, strict=True))
        workers = {key: self._rows_of(rows.worker_rows, key, per_worker) for key in keys}
        gpus = {uuid: self._rows_of(rows.gpu_rows, uuid, per_gpu) for uuid in uuids}
        rows.gpu_index.update(zip(uuids, indices, strict=True))
        for key, first in rows.worker_rows.items():
            if key not in workers:
                self._idle(rows, key, first, per_worker, now)
                for row in rows.plugin_rows.get(key, {}).values():
                    self.plugins.current[row] = 0
        for uuid, first in rows.gpu_rows.items():
            if uuid not in gpus:
                self._idle(rows, uuid, first, per_gpu, now)
        for key in chain(workers, gpus):
            rows.idle.pop(key, None)
        rows.groups, rows.instances, rows.uuids, rows.indices = groups, instances, uuids, indices
        rows.worker_dest = _dest([workers[key] for key in keys], per_worker)
        rows.gpu_dest = _dest([gpus[uuid] for uuid in uuids], per_gpu)
        firsts = [*workers.values(), *gpus.values()]
        rows.refused_at = self._released if min(firsts, default=0) < 0 else -1
        rows.refused_whole = max(firsts, default=0) < 0
        rows.recount()

    def _rows_of(self, held: dict, key, size: int) -> int:
        first = held.get(key, -1)
        if first < 0:
            first = self.values.allocate(size)
            if first is None:
                self.refused += size
                first = -1
            else:
                self.series += size
            held[key] = first
        return first

    def _idle(self, rows: HiveRows, key, first: int, size: int, now: float) -> None:
        if first >= 0 and key not in rows.idle:
            rows.idle[key] = now
            self.values.current[first:first + size] = 0

    def _gather_plugin_figures(self, rows: HiveRows, workers: list[WorkerTelemetry]) -> None:
        """Plugin figures, worker by worker (only workers that carry some pay for them): each
        ``plugin.metric`` is a series of its own, in float32 (any number a plugin gives)."""
        store = self.plugins
        for figures in rows.plugin_rows.values():
            store.current[list(figures.values())] = 0  # a figure not sent this time: a gap
        dest, values = [], []
        for worker in workers:
            if not worker.metrics:
                continue
            if not rows.plugin_rows:
                self._plugin_hives += 1
            held = rows.plugin_rows.setdefault(worker_key(worker), {})
            for metric, value in worker.metrics.items():
                row = held.get(metric)
                if row is None:
                    row = store.allocate(1)
                    if row is None:
                        self.refused += 1
                        continue
                    held[metric] = row
                    self.series += 1
                    self.plugin_metrics[metric] = self.plugin_metrics.get(metric, 0) + 1
                dest.append(row)
                values.append(value)
        if dest:
            store.current[dest] = store.codec.encode(np.array(values, np.float64))

    def forget_old(self, now: float) -> int:
        """Drop the series of workers, GPUs and hives not reported for the coarse retention;
        returns how many series."""
        horizon = now - self.settings.coarse_retention_s
        before = self.series
        with self._lock:
            for hive_id, rows in list(self.hives.items()):
                if not rows.live and rows.seen_at < horizon:  # silent, or gone, that long
                    for key in [*rows.worker_rows, *rows.gpu_rows]:
                        self._release(rows, key)
                    del self.hives[hive_id]
                    continue
                old = [key for key, since in rows.idle.items() if since < horizon]
                for key in old:
                    self._release(rows, key)
                    del rows.idle[key]
                if old:
                    rows.recount()
        return before - self.series

    def _release(self, rows: HiveRows, key) -> None:
        if isinstance(key, tuple):
            first, size = rows.worker_rows.pop(key), len(self.worker_metrics)
            figures = rows.plugin_rows.pop(key, {})
            for metric, row in figures.items():
                self.plugins.release(row, 1)
                self.series -= 1
                self._released += 1
                self.plugin_metrics[metric] -= 1
                if not self.plugin_metrics[metric]:
                    del self.plugin_metrics[metric]
            if figures and not rows.plugin_rows:
                self._plugin_hives -= 1
        else:
            first, size = rows.gpu_rows.pop(key), len(self.gpu_metrics)
            rows.gpu_index.pop(key, None)
        if first >= 0 and size:
            self.values.release(first, size)
            self.series -= size
            self._released += 1

    # -- querying --------------------------------------------------------------------------

    def query(self, selector: Selector, since_s: float, step_s: float | None, now: float
              ) -> HistoryAnswer:
        with self._lock:
            return answer(self, selector, since_s, step_s, now)


def _dest(firsts: list[int], size: int) -> np.ndarray:
    """Each series' row, run after run (-1, the store's sink, for a refused run)."""
    if not firsts:
        return NO_ROWS
    starts = np.array(firsts, np.intp)[:, None]
    return np.where(starts < 0, -1, starts + np.arange(size)).ravel()
