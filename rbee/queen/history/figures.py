"""Which figures history keeps, and how they are read out of many heartbeats at once.

A worker has nine built-in series, a GPU five, in the order of ``WORKER_METRICS`` and
``GPU_METRICS``. Figures in MiB are kept in GiB (float16 ends at 65,504) and given back in MiB.

Reading is per batch, not per series: for each figure, ``operator.attrgetter`` mapped over every
worker (or GPU) of the batch feeds ``np.fromiter`` (``None``, an unknown figure, becomes NaN: a
gap, never 0). No Python bytecode runs per figure: what it costs is reading the structs, tens of
nanoseconds per figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter
from types import SimpleNamespace

import numpy as np

from ...contract import GpuDevice, WorkerTelemetry

WORKER_METRICS = ("cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "vram_mb",
                  "engine_running", "engine_waiting", "kv_cache_pct")
"""A worker's series; ``vram_mb`` only for a worker on a GPU, the last three from its engine."""
GPU_METRICS = ("util_pct", "mem_util_pct", "vram_used_mb", "temperature_c", "power_w")
SCALES = {name: 1.0 for name in (*WORKER_METRICS, *GPU_METRICS)} | {
    "rss_mb": 1 / 1024, "vram_mb": 1 / 1024, "vram_used_mb": 1 / 1024}
"""Applied before storing (MiB kept in GiB); plugin figures are kept as they come."""
METRICS = frozenset(SCALES)
"""The built-in metrics; plugin figures add their own names (``plugin.metric``)."""

_WORKER_FIGURES = [(attrgetter(name), nullable) for name, nullable in (
    ("cpu_pct", False), ("rss_mb", False), ("io_r_mb_s", False), ("io_w_mb_s", False),
    ("gpu_util_pct", True), ("vram_mb", False))]
"""Each figure's getter, and whether it may be None (the contract says which)."""
_ENGINE_FIGURES = [(attrgetter(name), nullable) for name, nullable in (
    ("requests_running", False), ("requests_waiting", False), ("kv_cache_pct", True))]
_GPU_FIGURES = [(attrgetter(name), name != "vram_used_mb") for name in GPU_METRICS]
_NO_ENGINE = SimpleNamespace(requests_running=None, requests_waiting=None, kv_cache_pct=None)
_NONE_AS_NAN = {None: math.nan}
_WORKER_SCALE = np.array([SCALES[m] for m in WORKER_METRICS])
_GPU_SCALE = np.array([SCALES[m] for m in GPU_METRICS])
_engine_of = attrgetter("engine")
_gpus_of = attrgetter("gpus")
_indices_of = attrgetter("gpu_indices")
plugin_figures = attrgetter("metrics")
_group, _instance = attrgetter("group"), attrgetter("instance")
_uuid, _index = attrgetter("uuid"), attrgetter("index")
worker_key = attrgetter("group", "instance")


def labels(workers: Sequence[WorkerTelemetry], gpus: Sequence[GpuDevice]
           ) -> tuple[list[str], list[str], list[str], list[int]]:
    """The workers' groups and instances, the GPUs' UUIDs and indices (lists of strings and
    numbers: nothing the garbage collector has to follow)."""
    return (list(map(_group, workers)), list(map(_instance, workers)), list(map(_uuid, gpus)),
            list(map(_index, gpus)))


def _column(figure: attrgetter, objects: Sequence[object], nullable: bool) -> np.ndarray:
    """One figure of each object as float64, converted in C by ``np.fromiter`` (which takes
    the count: ``np.array`` on a list first scans it for a dtype, three times slower). A figure
    that may be None goes through ``dict.get(x, x)``, which turns None into NaN and leaves a
    number as it is (the getter runs twice per object, rather than making a tuple per object:
    a batch of tuples keeps the garbage collector busy)."""
    if not nullable:
        return np.fromiter(map(figure, objects), np.float64, len(objects))
    return np.fromiter(map(_NONE_AS_NAN.get, map(figure, objects), map(figure, objects)),
                       np.float64, len(objects))


def worker_values(workers: Sequence[WorkerTelemetry]) -> np.ndarray:
    """``(len(workers), 9)``: each worker's series in ``WORKER_METRICS`` order, scaled."""
    n = len(workers)
    values = np.empty((n, len(WORKER_METRICS)))
    for column, (figure, nullable) in enumerate(_WORKER_FIGURES):
        values[:, column] = _column(figure, workers, nullable)
    engines = list(map(_engine_of, workers))
    missing = None in engines
    if missing:
        engines = [engine if engine is not None else _NO_ENGINE for engine in engines]
    for column, (figure, nullable) in enumerate(_ENGINE_FIGURES, start=len(_WORKER_FIGURES)):
        values[:, column] = _column(figure, engines, nullable or missing)
    on_gpu = (np.fromiter(map(bool, map(_gpus_of, workers)), bool, n)
              | np.fromiter(map(bool, map(_indices_of, workers)), bool, n))
    values[~on_gpu, 5] = np.nan  # a worker on no GPU has no VRAM figure, not 0
    values *= _WORKER_SCALE
    return values


def gpu_values(gpus: Sequence[GpuDevice]) -> np.ndarray:
    """``(len(gpus), 5)``: each GPU's series in ``GPU_METRICS`` order, scaled."""
    values = np.empty((len(gpus), len(GPU_METRICS)))
    for column, (figure, nullable) in enumerate(_GPU_FIGURES):
        values[:, column] = _column(figure, gpus, nullable)
    values *= _GPU_SCALE
    return values
