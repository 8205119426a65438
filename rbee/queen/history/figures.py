"""Which figures history keeps, and how they are read out of many heartbeats at once.

A worker has nine built-in series, a GPU five, in the order of ``WORKER_METRICS`` and
``GPU_METRICS``. Figures in MiB are kept in GiB (float16 ends at 65,504) and given back in MiB.

Reading is per batch, not per series: ``operator.attrgetter`` pulls a worker's figures into a
tuple in C, the tuples of every worker of the batch are chained into one list and numpy turns it
into one array (``None``, an unknown figure, becomes NaN: a gap, never 0). No Python bytecode
runs per figure: the cost is a few tens of nanoseconds per figure, about 5 µs per eight-GPU hive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import chain
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

_WORKER = attrgetter("cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "vram_mb")
_WORKER_AND_ENGINE = attrgetter(
    "cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "vram_mb",
    "engine.requests_running", "engine.requests_waiting", "engine.kv_cache_pct")
_ENGINE = attrgetter("requests_running", "requests_waiting", "kv_cache_pct")
_GPU = attrgetter(*GPU_METRICS)
_NO_ENGINE = SimpleNamespace(requests_running=None, requests_waiting=None, kv_cache_pct=None)
_NONE_AS_NAN = {None: math.nan}
_WORKER_SCALE = np.array([SCALES[m] for m in WORKER_METRICS])
_GPU_SCALE = np.array([SCALES[m] for m in GPU_METRICS])
_engine_of = attrgetter("engine")
_gpus_of = attrgetter("gpus")
_indices_of = attrgetter("gpu_indices")
plugin_figures = attrgetter("metrics")
worker_key = attrgetter("group", "instance")
gpu_key = attrgetter("uuid", "index")


def _array(tuples: Iterable[tuple], rows: int, width: int) -> np.ndarray:
    """The figures of ``rows`` tuples of ``width`` as one float64 array, None as NaN. Converted
    in C: ``dict.get(x, x)`` turns None into NaN and leaves a number as it is, and
    ``np.fromiter`` takes the count (``np.array`` on the list first scans it for a dtype: three
    times slower)."""
    flat = list(chain.from_iterable(tuples))
    return np.fromiter(map(_NONE_AS_NAN.get, flat, flat), np.float64, len(flat)).reshape(
        rows, width)


def worker_values(workers: Sequence[WorkerTelemetry]) -> np.ndarray:
    """``(len(workers), 9)``: each worker's series in ``WORKER_METRICS`` order, scaled."""
    n = len(workers)
    engines = list(map(_engine_of, workers))
    if None not in engines:  # a fleet of inference engines: one getter for all nine
        values = _array(map(_WORKER_AND_ENGINE, workers), n, len(WORKER_METRICS))
    else:
        values = np.empty((n, len(WORKER_METRICS)))
        values[:, :6] = _array(map(_WORKER, workers), n, 6)
        engines = [engine if engine is not None else _NO_ENGINE for engine in engines]
        values[:, 6:] = _array(map(_ENGINE, engines), n, 3)
    on_gpu = (np.fromiter(map(bool, map(_gpus_of, workers)), bool, n)
              | np.fromiter(map(bool, map(_indices_of, workers)), bool, n))
    values[~on_gpu, 5] = np.nan  # a worker on no GPU has no VRAM figure, not 0
    values *= _WORKER_SCALE
    return values


def gpu_values(gpus: Sequence[GpuDevice]) -> np.ndarray:
    """``(len(gpus), 5)``: each GPU's series in ``GPU_METRICS`` order, scaled."""
    values = _array(map(_GPU, gpus), len(gpus), len(GPU_METRICS))
    values *= _GPU_SCALE
    return values
