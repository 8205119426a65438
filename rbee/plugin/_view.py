"""WorkerView: what a collector plugin sees of one worker: read-only, typed, stable across ticks.

The hive keeps one view per worker for the worker's life, so what a plugin stores in its
``state(owner)`` slot on one tick is there on the next; the per-tick fields (``sample``,
``previous``, ``elapsed_s``) are advanced by the hive before the per-worker hook runs. Nothing here
exposes the hive's own objects: a plugin written against this class keeps working when the hive's
internals change (``rbee.plugin.API_VERSION`` says when this class or a hook changes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .._sample import StatSample

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class WorkerView:
    __slots__ = ("_argv", "_cgroup_path", "_cgroup_paths", "_cpu_limit_pct", "_elapsed_s",
                 "_gpu_indices", "_group", "_instance", "_limits_applied", "_memory_limit_mb",
                 "_metrics_url", "_pid", "_pids", "_previous", "_sample", "_start_ticks", "_states")

    def __init__(self, *, group: str, instance: str, pid: int, argv: tuple[str, ...],
                 cgroup_path: str | None, start_ticks: int, cpu_limit_pct: float | None,
                 memory_limit_mb: float | None, limits_applied: bool,
                 gpu_indices: tuple[int, ...], metrics_url: str | None,
                 pids: Callable[[], list[int]],
                 cgroup_paths: Mapping[str, str] | None = None) -> None:
        self._group, self._instance, self._pid, self._argv = group, instance, pid, argv
        self._cgroup_paths = MappingProxyType(dict(cgroup_paths or {}))
        self._cgroup_path, self._start_ticks = cgroup_path, start_ticks
        self._cpu_limit_pct, self._memory_limit_mb = cpu_limit_pct, memory_limit_mb
        self._limits_applied, self._gpu_indices = limits_applied, gpu_indices
        self._metrics_url, self._pids = metrics_url, pids
        self._sample: StatSample | None = None
        self._previous: StatSample | None = None
        self._elapsed_s = 0.0
        self._states: dict[str, dict[str, Any]] = {}

    def _advance(self, sample: StatSample, previous: StatSample | None, elapsed_s: float) -> None:
        """The hive's side: this tick's sample. Not for plugins."""
        self._sample, self._previous, self._elapsed_s = sample, previous, elapsed_s

    # -- identity -------------------------------------------------------------------------

    @property
    def group(self) -> str:
        return self._group

    @property
    def instance(self) -> str:
        return self._instance

    @property
    def pid(self) -> int:
        """The worker's main process."""
        return self._pid

    @property
    def argv(self) -> tuple[str, ...]:
        """The main process's command line as the hive started it (or read it, if re-adopted)."""
        return self._argv

    @property
    def cgroup_path(self) -> str | None:
        """The worker's cgroup directory (the first hierarchy's on cgroup v1); None without
        cgroups."""
        return self._cgroup_path

    @property
    def cgroup_paths(self) -> Mapping[str, str]:
        """The worker's cgroup directory per controller: ``cgroup_paths["memory"]`` is where its
        ``memory.*`` files are, on cgroup v1 (one hierarchy per controller) as on v2 (one
        directory, listed under each controller enabled there). Empty without cgroups."""
        return self._cgroup_paths

    @property
    def start_boottime_s(self) -> float | None:
        """When the main process started, in seconds of CLOCK_BOOTTIME (the kernel's own clock,
        ``time.clock_gettime(time.CLOCK_BOOTTIME)`` minus this is its uptime); None if unknown."""
        return self._start_ticks / CLOCK_TICKS if self._start_ticks >= 0 else None

    # -- limits and placement -------------------------------------------------------------

    @property
    def cpu_limit_pct(self) -> float | None:
        """CPU limit in percent of one core (200.0 = two cores); None when unlimited."""
        return self._cpu_limit_pct

    @property
    def memory_limit_mb(self) -> float | None:
        return self._memory_limit_mb

    @property
    def limits_applied(self) -> bool:
        """False when the hive runs without cgroups and the limits are not enforced."""
        return self._limits_applied

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs the worker was given (its ``CUDA_VISIBLE_DEVICES``); empty when not set. What
        it really uses is measured by the GPU collector into ``telemetry.gpu_indices``."""
        return self._gpu_indices

    @property
    def metrics_url(self) -> str | None:
        """Where the worker's engine publishes Prometheus metrics, as its spec says; None if the
        spec did not say (the engine collector then looks at ``argv``)."""
        return self._metrics_url

    def pids(self) -> list[int]:
        """Every PID in the worker's cgroup, children included (the main PID without cgroups).
        Reads the cgroup each call."""
        return self._pids()

    # -- this tick ------------------------------------------------------------------------

    @property
    def sample(self) -> StatSample:
        """This tick's raw counters from the worker's cgroup and /proc files (-1: unreadable)."""
        if self._sample is None:
            raise RuntimeError("no sample yet: the view is read inside a collection tick")
        return self._sample

    @property
    def previous(self) -> StatSample | None:
        """The previous tick's counters; None on the worker's first tick."""
        return self._previous

    @property
    def elapsed_s(self) -> float:
        """Seconds between ``previous`` and ``sample``; 0.0 on the first tick."""
        return self._elapsed_s

    # -- per-plugin state -----------------------------------------------------------------

    def state(self, owner: str) -> dict[str, Any]:
        """A dict that lives as long as the worker, one per ``owner`` (use your plugin's name):
        where a plugin keeps what it needs between ticks, or hands from its async refresh to its
        per-worker hook. Dropped with the worker."""
        slot = self._states.get(owner)
        if slot is None:  # setdefault: atomic, the async refresh and the tick may race here
            slot = self._states.setdefault(owner, {})
        return slot

    def __repr__(self) -> str:
        return f"WorkerView({self._group}/{self._instance}, pid {self._pid})"
