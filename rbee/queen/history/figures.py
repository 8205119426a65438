"""Which figures history keeps, and how they are read out of many heartbeats at once.

A worker has up to nine built-in series, a GPU up to five, in the order of ``WORKER_METRICS`` and
``GPU_METRICS``; ``history.worker_metrics`` and ``history.gpu_metrics`` choose which (a
``Figures``). Figures in MiB are kept in GiB (float16 ends at 65,504) and given back in MiB.

Reading is per batch, not per series: one ``operator.attrgetter`` of every chosen figure, mapped
over the batch's workers (or GPUs) and flattened by ``itertools.chain``, feeds one
``np.fromiter`` (which turns ``None``, an unknown figure, into NaN: a gap, never 0). No Python
bytecode runs per figure or per worker: what it costs is reading the structs, tens of
nanoseconds per figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter
from types import SimpleNamespace

import numpy as np

from ...contract import GpuDevice, WorkerTelemetry
from ...settings import HISTORY_GPU_METRICS, HISTORY_WORKER_METRICS, HistorySettings

WORKER_METRICS = HISTORY_WORKER_METRICS
"""A worker's series; ``vram_mb`` only for a worker on a GPU, the last three from its engine."""
GPU_METRICS = HISTORY_GPU_METRICS
SCALES = {name: 1.0 for name in (*WORKER_METRICS, *GPU_METRICS)} | {
    "rss_mb": 1 / 1024, "vram_mb": 1 / 1024, "vram_used_mb": 1 / 1024}
"""Applied before storing (MiB kept in GiB); plugin figures are kept as they come."""
METRICS = frozenset(SCALES)
"""The built-in metrics; plugin figures add their own names (``plugin.metric``)."""
_ENGINE_FIELDS = {"engine_running": "requests_running", "engine_waiting": "requests_waiting",
                  "kv_cache_pct": "kv_cache_pct"}
"""The worker series read from its engine's state, and the field each is read from."""
_NO_ENGINE = SimpleNamespace(requests_running=None, requests_waiting=None, kv_cache_pct=None)
_engine_of = attrgetter("engine")
plugin_figures = attrgetter("metrics")
worker_key = attrgetter("group", "instance")
_group, _instance = attrgetter("group"), attrgetter("instance")
_uuid, _index = attrgetter("uuid"), attrgetter("index")


def labels(workers: Sequence[WorkerTelemetry], gpus: Sequence[GpuDevice]
           ) -> tuple[list[str], list[str], list[str], list[int]]:
    """The workers' groups and instances, the GPUs' UUIDs and indices: four lists (a tuple per
    worker would cost twice as much, and keep the garbage collector busy)."""
    return (list(map(_group, workers)), list(map(_instance, workers)), list(map(_uuid, gpus)),
            list(map(_index, gpus)))


def _getter(fields: Sequence[str]) -> tuple[attrgetter, bool] | None:
    """One getter of every field, and whether it gives a tuple (more than one field)."""
    return (attrgetter(*fields), len(fields) > 1) if fields else None


def _read(getter: tuple[attrgetter, bool] | None, objects: Sequence[object], width: int
          ) -> np.ndarray:
    """``(len(objects), width)`` float64: each object's fields, through one ``np.fromiter``
    (given the count: ``np.array`` on a list first scans it for a dtype, three times slower)."""
    if getter is None or not objects:
        return np.empty((len(objects), width))
    get, many = getter
    figures = chain.from_iterable(map(get, objects)) if many else map(get, objects)
    return np.fromiter(figures, np.float64, len(objects) * width).reshape(len(objects), width)


class Figures:
    """The series kept of each worker and each GPU (``history.worker_metrics``, ``gpu_metrics``,
    in canonical order), and how a batch's values are read."""

    def __init__(self, settings: HistorySettings) -> None:
        chosen = set(settings.worker_metrics)
        self.worker = tuple(name for name in WORKER_METRICS if name in chosen)
        chosen = set(settings.gpu_metrics)
        self.gpu = tuple(name for name in GPU_METRICS if name in chosen)
        own = [name for name in self.worker if name not in _ENGINE_FIELDS]
        engine = [name for name in self.worker if name in _ENGINE_FIELDS]
        self._own = _getter(own)
        self._engine = _getter([_ENGINE_FIELDS[name] for name in engine])
        self._own_columns = [self.worker.index(name) for name in own]
        self._engine_columns = [self.worker.index(name) for name in engine]
        self._vram = self.worker.index("vram_mb") if "vram_mb" in self.worker else None
        self._gpu = _getter(self.gpu)
        self._worker_scale = np.array([SCALES[m] for m in self.worker])
        self._gpu_scale = np.array([SCALES[m] for m in self.gpu])

    def metrics(self) -> frozenset[str]:
        return frozenset((*self.worker, *self.gpu))

    def worker_values(self, workers: Sequence[WorkerTelemetry]) -> np.ndarray:
        """``(len(workers), len(self.worker))``: each worker's series in order, scaled."""
        own = _read(self._own, workers, len(self._own_columns))
        if not self._engine_columns:
            values = own
        else:
            engines = list(map(_engine_of, workers))
            if None in engines:
                engines = [e if e is not None else _NO_ENGINE for e in engines]
            values = np.empty((len(workers), len(self.worker)))
            values[:, self._own_columns] = own
            values[:, self._engine_columns] = _read(self._engine, engines,
                                                    len(self._engine_columns))
        if self._vram is not None:  # a worker on no GPU (it reports 0) has no VRAM figure
            column = self._vram
            for at in np.flatnonzero(values[:, column] == 0).tolist():
                if not (workers[at].gpus or workers[at].gpu_indices):
                    values[at, column] = np.nan
        values *= self._worker_scale
        return values

    def gpu_values(self, gpus: Sequence[GpuDevice]) -> np.ndarray:
        """``(len(gpus), len(self.gpu))``: each GPU's series in order, scaled."""
        values = _read(self._gpu, gpus, len(self.gpu))
        values *= self._gpu_scale
        return values
