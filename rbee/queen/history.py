"""Built-in history: per worker and per GPU, a bounded series of each figure, no extra service.

Two tiers per series, fixed in size when the series is created: ``fine`` (1 s for 15 minutes by
default) and ``coarse`` (10 s averages for 6 hours). Values are stored as 16-bit floats (three
significant digits, what a chart needs) in ring buffers of bytes: 2 bytes a point, so a series costs
1,800 bytes for its 15 minutes at 1 s (120 bytes per series-minute) plus 4,320 for 6 hours at 10 s.
Figures in MiB are kept in GiB (float16 ends at 65,504) and given back in MiB.

The queen records the whole fleet once per fine step from its registry (not per heartbeat, which
keeps ingestion as cheap as it was); a hive that is stale leaves a gap. History is in memory only:
it starts empty after a restart. A series not written for the coarse retention is dropped, and the
number of series is capped (``history.max_series``): past it, new series are not recorded.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config import HistorySettings
from ..contract import GpuDevice, HistoryAnswer, HiveRecord, SeriesData, WorkerTelemetry, on_gpu

NAN16 = struct.pack("<e", math.nan)
MAX16 = 65504.0

WORKER_METRICS: dict[str, tuple[Callable[[WorkerTelemetry], float | None], float]] = {
    # name: (value, scale applied before storing)
    "cpu_pct": (lambda w: w.cpu_pct, 1.0),
    "rss_mb": (lambda w: w.rss_mb, 1 / 1024),
    "io_r_mb_s": (lambda w: w.io_r_mb_s, 1.0),
    "io_w_mb_s": (lambda w: w.io_w_mb_s, 1.0),
    "gpu_util_pct": (lambda w: w.gpu_util_pct, 1.0),
    "vram_mb": (lambda w: w.vram_mb if on_gpu(w) else None, 1 / 1024),  # none: a gap, not 0
    # the worker's inference engine, where known (None otherwise: a gap, never 0)
    "engine_running": (lambda w: w.engine.requests_running if w.engine else None, 1.0),
    "engine_waiting": (lambda w: w.engine.requests_waiting if w.engine else None, 1.0),
    "kv_cache_pct": (lambda w: w.engine.kv_cache_pct if w.engine else None, 1.0),
}
GPU_METRICS: dict[str, tuple[Callable[[GpuDevice], float | None], float]] = {
    "util_pct": (lambda d: d.util_pct, 1.0),
    "mem_util_pct": (lambda d: d.mem_util_pct, 1.0),
    "vram_used_mb": (lambda d: d.vram_used_mb, 1 / 1024),
    "temperature_c": (lambda d: d.temperature_c, 1.0),
    "power_w": (lambda d: d.power_w, 1.0),
}
SCALES = {name: scale for name, (_, scale) in (*WORKER_METRICS.items(), *GPU_METRICS.items())}


class Ring:
    """One tier of one series: ``slots`` float16 points, ``step`` seconds apart."""

    __slots__ = ("data", "last", "slots")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.data = bytearray(NAN16 * slots)
        self.last = -1
        """The absolute index (time // step) of the newest point written."""

    def put(self, index: int, value: float) -> None:
        if index > self.last:
            if self.last >= 0:  # a new ring is all NaN already
                self._clear(max(self.last + 1, index - self.slots + 1), index)
            self.last = index
        elif index <= self.last - self.slots:
            return  # older than the ring holds
        struct.pack_into("<e", self.data, (index % self.slots) * 2, value)

    def _clear(self, first: int, stop: int) -> None:
        """NaN over points ``first``..``stop - 1`` (fewer than ``slots``): the gap a silence left,
        in at most two slice writes (point by point, 6,000 new series stalled the queen 18 s)."""
        count = stop - first
        if count <= 0:
            return
        start = first % self.slots
        head = min(count, self.slots - start)
        self.data[start * 2:(start + head) * 2] = NAN16 * head
        if count > head:
            self.data[:(count - head) * 2] = NAN16 * (count - head)

    def read(self, first: int, last: int) -> list[float]:
        """Points ``first``..``last`` (absolute indices); NaN where nothing is held."""
        low, high = max(first, self.last - self.slots + 1), min(last, self.last)
        if low > high:
            return [math.nan] * (last - first + 1)
        values = [math.nan] * (low - first)
        start, count = low % self.slots, high - low + 1
        head = min(count, self.slots - start)  # up to the end of the ring, then from its start
        values += struct.unpack_from(f"<{head}e", self.data, start * 2)
        if count > head:
            values += struct.unpack_from(f"<{count - head}e", self.data, 0)
        values += [math.nan] * (last - high)
        return values


class Series:
    __slots__ = ("bucket", "bucket_count", "bucket_sum", "coarse", "fine", "written_at")

    def __init__(self, fine_slots: int, coarse_slots: int) -> None:
        self.fine = Ring(fine_slots)
        self.coarse = Ring(coarse_slots)
        self.bucket = -1
        self.bucket_sum = 0.0
        self.bucket_count = 0
        self.written_at = 0.0

    def add(self, now: float, value: float, fine_step: float, coarse_step: float) -> None:
        self.written_at = now
        self.fine.put(int(now // fine_step), value)
        bucket = int(now // coarse_step)
        if bucket != self.bucket:
            self.bucket, self.bucket_sum, self.bucket_count = bucket, 0.0, 0
        if not math.isnan(value):
            self.bucket_sum += value
            self.bucket_count += 1
            self.coarse.put(bucket, self.bucket_sum / self.bucket_count)  # the running average


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


class FleetHistory:
    def __init__(self, settings: HistorySettings | None = None) -> None:
        self.settings = settings or HistorySettings()
        s = self.settings
        self.fine_slots = int(s.fine_retention_s // s.fine_step_s)
        self.coarse_slots = int(s.coarse_retention_s // s.coarse_step_s)
        self._series: dict[tuple, Series] = {}
        self._gpu_index: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.refused = 0
        """Series not recorded because ``max_series`` was reached."""

    def __len__(self) -> int:
        return len(self._series)

    # -- recording -------------------------------------------------------------------------

    def record(self, hives: Iterable[HiveRecord], now: float) -> None:
        """One point of every figure of every fresh hive, at ``now`` (Unix time)."""
        with self._lock:
            for hive in hives:
                if hive.stale:
                    continue
                hive_id = hive.info.id
                for worker in hive.workers:
                    for metric, (value_of, scale) in WORKER_METRICS.items():
                        self._add(("w", hive_id, worker.group, worker.instance, metric),
                                  value_of(worker), scale, now)
                for device in hive.gpus:
                    self._gpu_index[(hive_id, device.uuid)] = device.index
                    for metric, (value_of, scale) in GPU_METRICS.items():
                        self._add(("g", hive_id, device.uuid, metric), value_of(device), scale,
                                  now)

    def _add(self, key: tuple, value: float | None, scale: float, now: float) -> None:
        series = self._series.get(key)
        if series is None:
            if value is None:
                return  # a figure never known (no engine, no sensor) costs no series
            if len(self._series) >= self.settings.max_series:
                self.refused += 1
                return
            series = self._series[key] = Series(self.fine_slots, self.coarse_slots)
        stored = math.nan if value is None else min(MAX16, max(-MAX16, value * scale))
        series.add(now, stored, self.settings.fine_step_s, self.settings.coarse_step_s)

    def forget_old(self, now: float) -> int:
        """Drop series not written for the coarse retention; returns how many."""
        horizon = now - self.settings.coarse_retention_s
        with self._lock:
            old = [key for key, series in self._series.items() if series.written_at < horizon]
            for key in old:
                del self._series[key]
        return len(old)

    # -- querying --------------------------------------------------------------------------

    def query(self, selector: Selector, since_s: float, step_s: float | None, now: float
              ) -> HistoryAnswer:
        s = self.settings
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
        columns = (last - first + 1) // per_column
        timestamps = [(first + i * per_column) * stored_step for i in range(columns)]
        found = []
        with self._lock:
            matches = [(key, series) for key, series in self._series.items()
                       if self._matches(key, selector)]
            if len(matches) > s.max_series_per_query:
                raise QueryError(
                    f"{len(matches)} series match, more than history.max_series_per_query "
                    f"({s.max_series_per_query}): narrow the query with hive, group, instance, "
                    f"gpu or metric")
            for key, series in sorted(matches, key=lambda item: item[0]):
                ring = series.fine if fine else series.coarse
                points = ring.read(first, first + columns * per_column - 1)
                found.append(self._series_data(key, _columns(points, per_column,
                                                             1 / SCALES[key[-1]])))
        return HistoryAnswer(start=timestamps[0] if timestamps else now, step=step_s,
                             timestamps=timestamps, series=found, adjusted=adjusted)

    def _matches(self, key: tuple, selector: Selector) -> bool:
        if selector.metrics is not None and key[-1] not in selector.metrics:
            return False
        if selector.hive is not None and key[1] != selector.hive:
            return False
        if key[0] == "w":
            return (selector.gpu is None and selector.group in (None, key[2])
                    and selector.instance in (None, key[3]))
        if selector.group is not None or selector.instance is not None:
            return False
        return selector.gpu is None or selector.gpu in (
            key[2], str(self._gpu_index.get((key[1], key[2]))))

    def _series_data(self, key: tuple, values: list[float | None]) -> SeriesData:
        if key[0] == "w":
            return SeriesData(hive=key[1], group=key[2], instance=key[3], metric=key[4],
                              values=values)
        return SeriesData(hive=key[1], gpu=key[2], gpu_index=self._gpu_index.get(key[1:3]),
                          metric=key[3], values=values)


def _columns(points: list[float], per_column: int, unscale: float) -> list[float | None]:
    """Average ``per_column`` points into each column (NaN points skipped; None if all are)."""
    columns: list[float | None] = []
    for start in range(0, len(points), per_column):
        known = [p for p in points[start:start + per_column] if not math.isnan(p)]
        columns.append(round(sum(known) / len(known) * unscale, 3) if known else None)
    return columns


METRICS = frozenset(SCALES)
