"""The collector's per-worker state: the worker's stat files kept open (``StatSource``), its recent
readings (``RateWindow``) and the view plugins see of it, together in one ``Sampled`` per worker,
made when the collector first sees the worker and closed when the worker is gone.

The process side (``rbee.hive.processes``) only says where a worker's counters are
(``Worker.stat_paths``); reading them, and remembering what was read, is collection's job.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable

from .. import statfiles
from ..plugin import WorkerView
from .cgroups import StatPaths
from .processes import Worker
from .procfs import open_pidfd
from .rates import RateWindow


class StatSource:
    """A worker's stat files, opened once and re-read with pread every tick (see design notes).

    Liveness comes from a pidfd (one ``poll`` for all workers per tick), and the start time never
    changes, so ``/proc/<pid>/stat`` is read once here and per tick only where no cgroup counts
    the worker's CPU or memory (the none backend, or v2 without the memory controller).
    """

    __slots__ = ("args", "fds", "pidfd", "start_ticks")

    def __init__(self, paths: StatPaths, pid: int) -> None:
        self.fds: list[int] = []
        cpu = self._open(paths.cpu)
        memory_current = self._open(paths.memory_current)
        memory_stat = self._open(paths.memory_stat)
        io = self._open(paths.io)
        proc_stat = self._open(f"/proc/{pid}/stat")
        first = statfiles.read_sample(-1, 0, -1, -1, 0, -1, 0, proc_stat)
        self.start_ticks = first.proc_start_ticks
        self.pidfd = open_pidfd(pid)
        if self.pidfd >= 0 and paths.cpu is not None and paths.memory_stat is not None:
            self.fds.remove(proc_stat)
            os.close(proc_stat)
            proc_stat = -1
        self.args = (cpu, paths.cpu_format, memory_current, memory_stat, paths.memory_stat_format,
                     io, paths.io_format, proc_stat)

    def _open(self, path: str | None) -> int:
        if path is None:
            return -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Sampled:
    """What the collector keeps of one worker between ticks."""

    __slots__ = ("rates", "stats", "view", "worker")

    def __init__(self, worker: Worker, rate_window_s: float) -> None:
        self.worker = worker
        self.stats = StatSource(worker.stat_paths, worker.pid)
        self.rates = RateWindow(rate_window_s)
        self.view = WorkerView(
            group=worker.group, instance=worker.instance, pid=worker.pid, argv=worker.argv,
            cgroup_path=worker.cgroup_path, start_ticks=self.stats.start_ticks,
            cpu_limit_pct=worker.limits.cpu_pct, memory_limit_mb=worker.limits.memory_mb,
            limits_applied=worker.limits_applied, gpu_indices=worker.gpu_hint,
            metrics_url=worker.metrics_url, pids=worker.list_pids,
            cgroup_paths=worker.cgroup_paths)

    def close(self) -> None:
        self.stats.close()


def exited(sampled: Iterable[Sampled]) -> set[int]:
    """PIDs of the workers whose main process has exited, from one poll over their pidfds.

    Workers without a pidfd are judged by their /proc state, read in their per-tick sample."""
    poller = select.poll()
    by_fd = {}
    for entry in sampled:
        pidfd = entry.stats.pidfd
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
            by_fd[pidfd] = entry.worker.pid
    return {by_fd[fd] for fd, _ in poller.poll(0)} if by_fd else set()
