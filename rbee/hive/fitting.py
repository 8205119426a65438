"""A hive's side of the contract's bounds: what it collected, cut to what the queen accepts.

A plugin, a command line or a driver may put anything into a record; ``fit_worker`` and
``fit_gpu`` cut it, in place, before the heartbeat is sent, so the hive's heartbeats always decode
(``rbee/contract/bounds.py``). They run for every worker every tick: a record within bounds costs
only a few checks.
"""

from __future__ import annotations

import re

import msgspec

from ..contract.bounds import (
    LONG_TEXT_CHARS,
    MAX_ERRORS,
    MAX_FIGURE,
    MAX_GPUS,
    MAX_METRICS,
    METRIC_KEY_CHARS,
    METRIC_KEY_PATTERN,
    SHORT_TEXT_CHARS,
    cut,
)
from ..contract.messages import CollectorIssue, GpuDevice, Healthy, WorkerTelemetry

_WORKER_FIGURES = ("cpu_pct", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "rate_window_s",
                   "memory_mb", "rss_mb", "vram_mb", "total_vram_mb", "uptime_s")
_WHOLE = ("rss_mb", "vram_mb", "total_vram_mb", "uptime_s")
_GPU_USE_FIGURES = ("vram_mb", "util_pct", "mem_util_pct", "util_window_s", "sample_age_s")
_DEVICE_FIGURES = ("util_pct", "mem_util_pct", "vram_total_mb", "vram_used_mb", "vram_free_mb",
                   "power_w", "sample_age_s")
_metric_key = re.compile(METRIC_KEY_PATTERN)
_KNOWN_METRIC_KEYS_MAX = 65536


_MAX_FIGURE_F = float(MAX_FIGURE)  # a float compares faster with a float than with an int


def _in_range(value: float, low: float = 0.0) -> bool:
    return low <= value <= _MAX_FIGURE_F  # False for NaN too


def _fit_figures(record: msgspec.Struct, names: tuple[str, ...],
                 unknowable: tuple[str, ...] = ()) -> list[str]:
    """Out-of-range figures of ``record`` set to None (unknown) if in ``unknowable``, else 0."""
    problems = []
    for name in names:
        value = getattr(record, name)
        if value is not None and not _in_range(value):
            problems.append(f"{name} {value!r} out of range")
            setattr(record, name, None if name in unknowable else 0)
    return problems


def _fit_issues(issues: list[CollectorIssue]) -> list[CollectorIssue]:
    if len(issues) <= MAX_ERRORS and all(len(i.message) <= LONG_TEXT_CHARS
                                         and len(i.collector) <= SHORT_TEXT_CHARS for i in issues):
        return issues
    return [CollectorIssue(collector=cut(i.collector, SHORT_TEXT_CHARS),
                           message=cut(i.message, LONG_TEXT_CHARS)) for i in issues[:MAX_ERRORS]]


def _all_in_range(values: list, low: float = 0.0) -> bool:
    """Every value (numbers) within [low, MAX_FIGURE]: three C calls, whatever the count; a NaN
    makes the sum NaN and fails it."""
    return not values or (min(values) >= low and max(values) <= _MAX_FIGURE_F
                          and sum(values) == sum(values))


def fit_worker(worker: WorkerTelemetry) -> None:
    """Cut a freshly collected record to the contract's bounds, in place, so the queen accepts
    the heartbeat whatever a plugin, a command line or a driver put into it: long text is
    shortened, whole-number fields are rounded, a figure out of range becomes 0 (or unknown),
    metrics that cannot be sent are dropped. What was changed is said in ``errors`` (collector
    ``contract``). It runs for every worker every tick, so a record within bounds costs only a
    few checks."""
    problems: list[str] = []
    figures = [worker.cpu_pct, worker.io_r_mb_s, worker.io_w_mb_s, worker.rate_window_s,
               worker.memory_mb, worker.rss_mb, worker.vram_mb, worker.total_vram_mb,
               worker.uptime_s]  # _WORKER_FIGURES, spelled out: this runs every tick
    if worker.gpu_util_pct is not None:
        figures.append(worker.gpu_util_pct)
    if not _all_in_range(figures):
        problems += _fit_figures(worker, _WORKER_FIGURES, ("gpu_util_pct",))
    if not (type(worker.rss_mb) is type(worker.vram_mb) is type(worker.total_vram_mb)
            is type(worker.uptime_s) is int):
        for name in _WHOLE:
            setattr(worker, name, round(getattr(worker, name)))
    if worker.model is not None and len(worker.model) > SHORT_TEXT_CHARS:
        worker.model = cut(worker.model, SHORT_TEXT_CHARS)
    if worker.metrics and not (len(worker.metrics) <= MAX_METRICS
                               and worker.metrics.keys() <= _known_metric_keys
                               and _all_metric_values(list(worker.metrics.values()))):
        problems += _fit_metrics(worker)
    indices = worker.gpu_indices
    if indices and (len(indices) > MAX_GPUS or min(indices) < 0 or max(indices) >= MAX_GPUS):
        problems.append("GPU indices out of range dropped")
        worker.gpu_indices = [i for i in indices if 0 <= i < MAX_GPUS][:MAX_GPUS]
    if worker.gpus:
        worker.gpus = worker.gpus[:MAX_GPUS]
        for use in worker.gpus:
            use.uuid = cut(use.uuid, SHORT_TEXT_CHARS)
            problems += _fit_figures(use, _GPU_USE_FIGURES, ("vram_mb", "util_pct", "mem_util_pct"))
    if problems:
        worker.errors = [*worker.errors[:MAX_ERRORS - 1],
                         CollectorIssue(collector="contract", message="; ".join(problems))]
    if worker.errors:
        worker.errors = _fit_issues(worker.errors)


_known_metric_keys: set[str] = set()
DROPPED_NAMED = 8
"""Dropped metric keys named in the record's contract error (the rest are counted)."""


def _all_metric_values(values: list) -> bool:
    return all(type(v) is float or type(v) is int for v in values) and _all_in_range(
        values, -_MAX_FIGURE_F)


def _fit_metrics(worker: WorkerTelemetry) -> list[str]:
    """Keep the metrics the contract can carry (and remember their keys, so the next tick's
    check of the same keys is a set comparison)."""
    metrics = {key: value for key, value in worker.metrics.items()
               if isinstance(key, str) and len(key) <= METRIC_KEY_CHARS
               and _metric_key.match(key) and type(value) in (int, float)
               and _in_range(value, -_MAX_FIGURE_F)}
    if len(metrics) > MAX_METRICS:
        metrics = dict(list(metrics.items())[:MAX_METRICS])
    if len(_known_metric_keys) >= _KNOWN_METRIC_KEYS_MAX:
        _known_metric_keys.clear()
    _known_metric_keys.update(metrics)
    if len(worker.metrics) == len(metrics):
        return []
    dropped = [key for key in worker.metrics if key not in metrics]
    worker.metrics = metrics
    named = ", ".join(cut(repr(key), 72) for key in dropped[:DROPPED_NAMED])
    more = f" and {len(dropped) - DROPPED_NAMED} more" if len(dropped) > DROPPED_NAMED else ""
    return [f"{len(dropped)} metrics dropped: {named}{more} (at most {MAX_METRICS}, keys of "
            f"{METRIC_KEY_CHARS} characters {METRIC_KEY_PATTERN}, finite values)"]


def fit_gpu(device: GpuDevice) -> None:
    """A driver's device record cut to the contract's bounds, in place (as ``fit_worker``)."""
    device.uuid = cut(device.uuid, SHORT_TEXT_CHARS)
    device.name = cut(device.name, SHORT_TEXT_CHARS)
    if device.mig_parent_uuid is not None:
        device.mig_parent_uuid = cut(device.mig_parent_uuid, SHORT_TEXT_CHARS)
    problems = _fit_figures(device, _DEVICE_FIGURES, ("util_pct", "mem_util_pct", "power_w"))
    if device.temperature_c is not None and not _in_range(device.temperature_c, -_MAX_FIGURE_F):
        problems.append(f"temperature_c {device.temperature_c!r} out of range")
        device.temperature_c = None
    if not isinstance(device.health, Healthy) and len(device.health.reason) > LONG_TEXT_CHARS:
        device.health = type(device.health)(reason=cut(device.health.reason, LONG_TEXT_CHARS))
    if len(device.faults) > MAX_ERRORS or any(len(f.detail) > LONG_TEXT_CHARS
                                              for f in device.faults):
        device.faults = [msgspec.structs.replace(f, detail=cut(f.detail, LONG_TEXT_CHARS))
                         for f in device.faults[:MAX_ERRORS]]
    errors = device.errors
    if problems:
        errors = [*errors[:MAX_ERRORS - 1], CollectorIssue(collector="contract",
                                                           message="; ".join(problems))]
    device.errors = _fit_issues(errors)
