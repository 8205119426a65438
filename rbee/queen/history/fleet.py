"""The fleet's history: which rows belong to which hive, and one step of recording.

Each hive the queen records has a ``HiveRows``: the first row of each of its workers' nine series
and of each GPU's five (rows handed out once, when a worker or GPU is first seen, and kept while
it is), and the destination of every figure of its heartbeat in order (``worker_dest``,
``gpu_dest``). A step gathers only the hives whose registry record changed since the last step
(a new heartbeat is a new list of workers: an identity test, no comparison of values): their
workers and GPUs are read in one batch (``figures``), their values land in the store's
``current`` column with one fancy-index write, and every store's fine tier takes ``current`` as
its new column. A hive that goes stale or leaves the registry has its rows set to NaN once; a
fresh hive that sent nothing since the last step costs an identity test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from itertools import chain
from operator import attrgetter

import numpy as np

from ...config import HistorySettings
from ...contract import HistoryAnswer, HiveRecord
from .columns import Budget, Codec, Store
from .figures import (
    GPU_METRICS,
    METRICS,
    WORKER_METRICS,
    gpu_values,
    labels,
    plugin_figures,
    worker_key,
    worker_values,
)
from .hives import NO_ROWS, HiveRows
from .reading import Selector, answer

_LAYOUT = (attrgetter("groups"), attrgetter("instances"), attrgetter("uuids"),
           attrgetter("indices"))
"""What a hive's rows were laid out for, in the order ``figures.labels`` reads it."""
HIVES_PER_CHUNK = 100
"""Hives gathered between two checkpoints of the recording task (about 2 ms of work), so heartbeats
are answered between the parts."""


class FleetHistory:
    """The built-in history of every worker's and GPU's figures (see ``docs/history.md``)."""

    def __init__(self, settings: HistorySettings | None = None) -> None:
        self.settings = s = settings or HistorySettings()
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
        """Series held (a worker holds nine, a GPU five, whether each figure is known or not)."""
        self._closed = -1
        self._epoch = 0
        self._released = 0
        """Runs of rows freed so far: a hive refused whole is laid out again once it moved."""
        self._plugin_hives = 0
        """Hives holding plugin series (while none does, workers' figures are only tested for
        being empty, in one pass)."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.series

    def metrics(self) -> frozenset[str]:
        """Every metric a query may name: the built-in ones and the plugin figures held."""
        return METRICS.union(self.plugin_metrics)

    # -- recording -------------------------------------------------------------------------

    def record(self, hives: Iterable[HiveRecord], now: float) -> None:
        """One point of every figure of every fresh hive, at ``now`` (Unix time)."""
        for _ in self.recording(hives, now):
            pass

    def recording(self, hives: Iterable[HiveRecord], now: float) -> Iterator[None]:
        """``record`` in parts: it yields between them, where the caller may let other tasks
        run (a queen of 10,000 hives gathers in chunks of ``HIVES_PER_CHUNK``)."""
        index = int(now // self.settings.fine_step_s)
        changed = self._changed(hives, now)
        for start in range(0, len(changed), HIVES_PER_CHUNK):
            with self._lock:
                self._gather(changed[start:start + HIVES_PER_CHUNK], now)
            yield
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

    def _locked(self, parts: Iterator[None]) -> Iterator[None]:
        """Each of ``parts`` run under the lock, a yield after each."""
        while True:
            with self._lock:
                try:
                    next(parts)
                except StopIteration:
                    return
            yield

    def _changed(self, hives: Iterable[HiveRecord], now: float) -> list[tuple[HiveRows, HiveRecord]]:
        """The fresh hives with a heartbeat not gathered yet; stale and vanished ones are
        silenced."""
        self._epoch = epoch = self._epoch + 1
        changed, live = [], 0
        with self._lock:
            for record in hives:
                rows = self.hives.get(record.info.id)
                if record.stale:
                    if rows is not None and rows.live:
                        self._silence(rows)
                    continue
                if rows is None:
                    rows = self.hives[record.info.id] = HiveRows()
                rows.seen, rows.seen_at = epoch, now
                live += rows.live
                if rows.refused_at >= 0:  # some of its series did not fit
                    if rows.refused_at != self._released:
                        rows.groups = rows.uuids = ()  # rows were freed since: lay it out
                        rows.workers = None  # and gather it again
                    elif rows.refused_whole:
                        continue  # nothing of it fits, and nothing was freed since
                if rows.workers is not record.workers or rows.gpus is not record.gpus:
                    changed.append((rows, record))
            if live < sum(1 for rows in self.hives.values() if rows.live):
                for rows in self.hives.values():
                    if rows.live and rows.seen != epoch:
                        self._silence(rows)  # gone from the registry
        return changed

    def _silence(self, rows: HiveRows) -> None:
        rows.live = False
        rows.workers = rows.gpus = None  # gathered again when it is back
        self.values.current[rows.worker_dest] = 0
        self.values.current[rows.gpu_dest] = 0
        for figures in rows.plugin_rows.values():
            self.plugins.current[list(figures.values())] = 0

    def _gather(self, changed: list[tuple[HiveRows, HiveRecord]], now: float) -> None:
        workers = list(chain.from_iterable(record.workers for _, record in changed))
        gpus = list(chain.from_iterable(record.gpus for _, record in changed))
        seen = labels(workers, gpus)
        laid_out = tuple(list(chain.from_iterable(getter(rows) for rows, _ in changed))
                         for getter in _LAYOUT)
        if seen != laid_out:
            self._lay_out_changed(changed, seen, now)  # some hive's workers or GPUs changed
        for rows, record in changed:
            rows.workers, rows.gpus, rows.live = record.workers, record.gpus, True
        if self._plugin_hives or any(map(plugin_figures, workers)):
            for rows, record in changed:
                if rows.plugin_rows or any(map(plugin_figures, record.workers)):
                    self._gather_plugin_figures(rows, record)
        codec, current = self.values.codec, self.values.current
        if workers:
            dest = np.concatenate([rows.worker_dest for rows, _ in changed])
            current[dest] = codec.encode(worker_values(workers)).ravel()
        if gpus:
            dest = np.concatenate([rows.gpu_dest for rows, _ in changed])
            current[dest] = codec.encode(gpu_values(gpus)).ravel()

    def _lay_out_changed(self, changed: list[tuple[HiveRows, HiveRecord]],
                         seen: tuple[list, list, list, list], now: float) -> None:
        """Lay out again each hive whose workers or GPUs are not those of its last heartbeat."""
        groups, instances, uuids, indices = seen
        w = g = 0
        for rows, record in changed:
            w_end, g_end = w + len(record.workers), g + len(record.gpus)
            hive = (tuple(groups[w:w_end]), tuple(instances[w:w_end]), tuple(uuids[g:g_end]),
                    tuple(indices[g:g_end]))
            if hive != tuple(getter(rows) for getter in _LAYOUT):
                self._lay_out(rows, *hive, now)
            w, g = w_end, g_end

    def _lay_out(self, rows: HiveRows, groups: tuple, instances: tuple, uuids: tuple,
                 indices: tuple, now: float) -> None:
        """Rows for the workers and GPUs now reported (new ones get theirs); those no longer
        reported become NaN and idle (kept until ``forget_old``)."""
        worker_keys = tuple(zip(groups, instances, strict=True))
        workers = {key: self._rows_of(rows.worker_rows, key, len(WORKER_METRICS))
                   for key in worker_keys}
        gpus = {uuid: self._rows_of(rows.gpu_rows, uuid, len(GPU_METRICS)) for uuid in uuids}
        rows.gpu_index.update(zip(uuids, indices, strict=True))
        for key, first in rows.worker_rows.items():
            if key not in workers:
                self._idle(rows, key, first, len(WORKER_METRICS), now)
                for row in rows.plugin_rows.get(key, {}).values():
                    self.plugins.current[row] = 0
        for uuid, first in rows.gpu_rows.items():
            if uuid not in gpus:
                self._idle(rows, uuid, first, len(GPU_METRICS), now)
        for key in chain(workers, gpus):
            rows.idle.pop(key, None)
        rows.groups, rows.instances, rows.uuids, rows.indices = groups, instances, uuids, indices
        rows.worker_dest = _dest([workers[key] for key in worker_keys], len(WORKER_METRICS))
        rows.gpu_dest = _dest([gpus[uuid] for uuid in uuids], len(GPU_METRICS))
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

    def _gather_plugin_figures(self, rows: HiveRows, record: HiveRecord) -> None:
        """Plugin figures, worker by worker (only workers that carry some pay for them): each
        ``plugin.metric`` is a series of its own, in float32 (any number a plugin gives)."""
        store = self.plugins
        for figures in rows.plugin_rows.values():
            store.current[list(figures.values())] = 0  # a figure not sent this time: a gap
        dest, values = [], []
        for worker in record.workers:
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
            first, size = rows.worker_rows.pop(key), len(WORKER_METRICS)
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
            first, size = rows.gpu_rows.pop(key), len(GPU_METRICS)
            rows.gpu_index.pop(key, None)
        if first >= 0:
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
