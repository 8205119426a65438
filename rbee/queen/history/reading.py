"""Answering ``GET /v1/history``: the series a selector names, as aligned columns.

The series are found from the hives' rows (no scan of the stores), then each store is read once
for all of them (``Tier.read``: one fancy index per block). The coarse point of a bucket still
open (the current 10 s by default) is the mean of its fine points so far, computed here for the
rows asked; a series is answered once any of its figures was known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ...config import HistorySettings
from ...contract import HistoryAnswer, SeriesData
from .columns import Store, nan_mean
from .figures import SCALES
from .hives import HiveRows


class Held(Protocol):
    """What a query reads of ``FleetHistory``."""

    settings: HistorySettings
    hives: dict[str, HiveRows]
    values: Store
    plugins: Store
    per_bucket: int
    worker_metrics: tuple[str, ...]
    """The series kept of each worker, in the order of its rows (then of each GPU)."""
    gpu_metrics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Selector:
    hive: str | None = None
    group: str | None = None
    instance: str | None = None
    gpu: str | None = None
    """A GPU's UUID or its index on the hive."""
    metrics: frozenset[str] | None = None


class QueryError(ValueError):
    """A history query that cannot be answered; the message names the parameter."""


@dataclass(frozen=True, slots=True)
class _Window:
    """The stored points a query reads: absolute indices ``first..`` of the tier, ``columns``
    columns of ``per_column`` points each."""

    fine: bool
    first: int
    columns: int
    per_column: int

    @property
    def last(self) -> int:
        return self.first + self.columns * self.per_column - 1


def answer(history: Held, selector: Selector, since_s: float, step_s: float | None,
           now: float) -> HistoryAnswer:
    s = history.settings
    adjusted = []
    if since_s > s.coarse_retention_s:
        adjusted.append(f"since: history goes back {s.coarse_retention_s:g} s; "
                        f"{since_s:g} s asked")
        since_s = s.coarse_retention_s
    fine = since_s <= s.fine_retention_s
    stored_step = s.fine_step_s if fine else s.coarse_step_s
    if step_s is None:
        step_s = stored_step
    elif step_s < stored_step:
        adjusted.append(f"step: {stored_step:g} s is the finest kept for the last "
                        f"{since_s:g} s; {step_s:g} s asked")
        step_s = stored_step
    per_column = max(1, round(step_s / stored_step))
    step_s = per_column * stored_step
    last = int(now // stored_step)
    first = last - max(1, round(since_s / stored_step)) + 1
    first -= (last - first + 1) % per_column  # whole columns only
    window = _Window(fine, first, (last - first + 1) // per_column, per_column)
    timestamps = [(first + i * per_column) * stored_step for i in range(window.columns)]
    held = _held(history, selector)
    if held > s.max_series_per_query:
        raise QueryError(
            f"{held} series match, more than history.max_series_per_query "
            f"({s.max_series_per_query}): narrow the query with hive, group, instance, gpu or "
            f"metric")
    by_store: dict[int, list] = {}
    for match in _matches(history, selector):
        if match[2] >= 0:
            by_store.setdefault(id(match[1]), []).append(match)
    known = []  # per store: its matches that were ever known, and their rows
    for group in by_store.values():
        rows = np.array([match[2] for match in group], np.intp)
        flags = _known(history, group[0][1], rows)
        known.append(([m for m, flag in zip(group, flags, strict=True) if flag], rows[flags]))
    kept = []
    for group, rows in known:
        if len(rows):
            points = _points(history, group[0][1], rows, window)
            kept += [(m[0], m[3], p) for m, p in zip(group, points, strict=True)]
    kept.sort(key=lambda item: item[0])
    series = [_series_data(key, gpu_index, _values(points, per_column, key[-1]))
              for key, gpu_index, points in kept]
    return HistoryAnswer(start=timestamps[0] if timestamps else now, step=step_s,
                         timestamps=timestamps, series=series, adjusted=adjusted)


def _hives(history: Held, selector: Selector) -> list[tuple[str, HiveRows]]:
    if selector.hive is None:
        return list(history.hives.items())
    rows = history.hives.get(selector.hive)
    return [] if rows is None else [(selector.hive, rows)]


def _chosen(names: tuple[str, ...], metrics: frozenset[str] | None) -> list[tuple[int, str]]:
    return [(offset, name) for offset, name in enumerate(names)
            if metrics is None or name in metrics]


def _held(history: Held, selector: Selector) -> int:
    """How many series the selector names, known or not (what ``max_series_per_query``
    bounds): counted hive by hive, series by series only where a group, instance or GPU is
    named, so that a query over a whole large fleet is refused at once."""
    if selector.group is not None or selector.instance is not None or selector.gpu is not None:
        return sum(1 for match in _matches(history, selector) if match[2] >= 0)
    metrics = selector.metrics
    per_worker = len(_chosen(history.worker_metrics, metrics))
    per_gpu = len(_chosen(history.gpu_metrics, metrics))
    count = 0
    for _, rows in _hives(history, selector):
        count += rows.held_workers * per_worker + rows.held_gpus * per_gpu
        for figures in rows.plugin_rows.values():
            count += len(figures) if metrics is None else len(figures.keys() & metrics)
    return count


def _matches(history: Held, selector: Selector):
    """``(key, store, row, gpu_index)`` of each series the selector names (row -1: refused by
    the budget); keys sort as the answer lists them."""
    worker_metrics = _chosen(history.worker_metrics, selector.metrics)
    gpu_metrics = _chosen(history.gpu_metrics, selector.metrics)
    for hive_id, rows in _hives(history, selector):
        if selector.gpu is None:
            yield from _worker_matches(history, hive_id, rows, selector, worker_metrics)
        if selector.group is not None or selector.instance is not None:
            continue
        for uuid, first in rows.gpu_rows.items():
            index = rows.gpu_index.get(uuid)
            if selector.gpu not in (None, uuid, str(index)):
                continue
            for offset, metric in gpu_metrics:
                yield (("g", hive_id, uuid, metric), history.values,
                       first + offset if first >= 0 else -1, index)


def _worker_matches(history: Held, hive_id: str, rows: HiveRows, selector: Selector,
                    chosen: list[tuple[int, str]]):
    metrics = selector.metrics
    for (group, instance), first in rows.worker_rows.items():
        if selector.group not in (None, group) or selector.instance not in (None, instance):
            continue
        for offset, metric in chosen:
            yield (("w", hive_id, group, instance, metric), history.values,
                   first + offset if first >= 0 else -1, None)
        for metric, row in rows.plugin_rows.get((group, instance), {}).items():
            if metrics is None or metric in metrics:
                yield ("w", hive_id, group, instance, metric), history.plugins, row, None


def _known(history: Held, store: Store, rows: np.ndarray) -> np.ndarray:
    """Whether each row was ever known: in a closed coarse bucket (the store's flag), or in
    a fine point since the last one closed."""
    known = store.known[rows]
    if not known.all():
        first = max((store.coarse.last + 1) * history.per_bucket,
                    store.fine.last - store.fine.slots + 1)
        recent = store.codec.decode(store.fine.read(first, store.fine.last, rows[~known]))
        known[~known] = ~np.isnan(recent).all(axis=1)
    return known


def _points(history: Held, store: Store, rows: np.ndarray, window: _Window
            ) -> np.ndarray:
    """The stored points of ``rows`` in the window, as floats."""
    tier = store.fine if window.fine else store.coarse
    points = store.codec.decode(tier.read(window.first, window.last, rows))
    if window.fine:
        return points
    per_bucket = history.per_bucket
    open_first = max(window.first, store.coarse.last + 1,
                     (store.fine.last - store.fine.slots + 1) // per_bucket)
    if open_first <= window.last and len(rows):  # buckets not closed yet: from the fine points
        fine = store.codec.decode(store.fine.read(open_first * per_bucket,
                                                  (window.last + 1) * per_bucket - 1, rows))
        means, _ = nan_mean(fine.reshape(len(rows), -1, per_bucket), axis=2)
        points[:, open_first - window.first:] = means
    return points


def _values(points: np.ndarray, per_column: int, metric: str) -> list[float | None]:
    """Average ``per_column`` points into each column (NaN points skipped; None if all are)."""
    means, _ = nan_mean(points.reshape(-1, per_column), axis=1)
    unscale = 1 / SCALES.get(metric, 1.0)
    return [None if math.isnan(v) else round(v * unscale, 3) for v in means.tolist()]


def _series_data(key: tuple, gpu_index: int | None, values: list[float | None]) -> SeriesData:
    if key[0] == "w":
        return SeriesData(hive=key[1], group=key[2], instance=key[3], metric=key[4],
                          values=values)
    return SeriesData(hive=key[1], gpu=key[2], gpu_index=gpu_index, metric=key[3], values=values)
