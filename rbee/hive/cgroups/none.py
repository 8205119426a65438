"""No cgroups: plain processes, counters from /proc, limits reported as not applied.

For hosts without cgroup access (unprivileged, containers without delegation, not Linux-like).
A worker's children are not counted, and a restarted hive cannot re-adopt workers.
"""

from __future__ import annotations

import os
import signal

from ..._sample import IO_PROC
from ...limits import Limits
from ..procfs import pid_running
from .base import CgroupBackend, Placement, StatPaths


class NoCgroup(CgroupBackend):
    name = "none"

    def __init__(self) -> None:
        self._pids: dict[tuple[str, str], int] = {}

    def prepare(self) -> None:
        return None

    def create(self, group: str, instance: str, limits: Limits) -> Placement:
        requested = limits.cpu_pct is not None or limits.memory_bytes is not None
        return Placement(procs_files=(), limits_applied=not requested)

    def adopt(self, group: str, instance: str, pid: int) -> None:
        """Remember a spawned worker's PID: without a cgroup nothing else records membership."""
        self._pids[(group, instance)] = pid

    def kill(self, group: str, instance: str, sig: signal.Signals) -> None:
        """Signal the worker's process group: its session is its own (``start_new_session``),
        so its children get the signal without a cgroup to find them."""
        pid = self._pids.get((group, instance))
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def members(self, group: str, instance: str) -> list[int]:
        """The main process while it runs (a zombie does not: it has ended, only unreaped)."""
        pid = self._pids.get((group, instance))
        return [pid] if pid is not None and pid_running(pid) else []

    def remove(self, group: str, instance: str) -> None:
        self._pids.pop((group, instance), None)

    def pids(self, group: str, instance: str) -> list[int]:
        pid = self._pids.get((group, instance))
        return [pid] if pid is not None and os.path.exists(f"/proc/{pid}") else []

    def enumerate(self) -> list[tuple[str, str]]:
        return []

    def stat_paths(self, group: str, instance: str, pid: int) -> StatPaths:
        readable_io = os.access(f"/proc/{pid}/io", os.R_OK)
        return StatPaths(io=f"/proc/{pid}/io" if readable_io else None, io_format=IO_PROC)

    def read_limits(self, group: str, instance: str) -> Limits:
        return Limits()
