"""ProcessMonitor: spawns workers into their own cgroups, stops them, re-adopts them after a restart.

A worker is in its cgroup from its first instruction: the forked child writes its own PID into the
cgroup's ``cgroup.procs`` (file descriptors opened by the parent) before it ``exec``s the worker
binary, so no CPU time or memory is ever charged outside the cgroup. Workers get a session of their
own, so a Ctrl-C meant for the hive does not reach them, and a restarted hive finds them again.

The methods block (stop waits out a grace period); the trio hive calls them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from .. import statfiles
from .._errors import CgroupError, NotFoundError, SpawnError, WorkerExistsError
from ..telemetry import WorkerExit
from .cgroups import CgroupBackend, NoCgroup, StatPaths
from .exits import ending
from ..limits import Limits, parse_limits
from .oom import OomCounter
from .procfs import read_cmdline
from .rates import RateWindow
from .stderr_tail import OutputTail

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GONE_STATES = (-1, ord("Z"), ord("X"))
"""/proc states of a main process that has exited (unreadable, zombie, dead)."""


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


def open_pidfd(pid: int) -> int:
    """A pidfd that polls readable once the process exits; -1 where the kernel has none (< 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


def exited(workers: Sequence[Worker]) -> set[int]:
    """PIDs of the workers whose main process has exited, from one poll over their pidfds.

    Workers without a pidfd are judged by their /proc state, read in their per-tick sample."""
    poller = select.poll()
    by_fd = {}
    for worker in workers:
        if worker.stats.pidfd >= 0:
            poller.register(worker.stats.pidfd, select.POLLIN)
            by_fd[worker.stats.pidfd] = worker.pid
    return {by_fd[fd] for fd, _ in poller.poll(0)} if by_fd else set()


@dataclass(eq=False)
class Worker:
    """One worker process the hive looks after, with what the collectors need between ticks."""

    group: str
    instance: str
    pid: int
    argv: tuple[str, ...]
    limits: Limits
    limits_applied: bool
    stats: StatSource
    process: subprocess.Popen[bytes] | None = None
    """None for a worker re-adopted after a hive restart: it is not our child."""
    gpu_hint: tuple[int, ...] = ()
    """GPU indices from the worker's CUDA_VISIBLE_DEVICES, used until NVML sees its processes."""
    rates: RateWindow | None = None
    """Recent readings of the worker's counters, kept by the collector (``rbee.hive.rates``)."""
    list_pids: Callable[[], list[int]] = list
    """Every PID in the worker's cgroup, children included (only the main PID without one)."""
    cgroup_path: str | None = None
    metrics_url: str | None = None
    """Where the worker's engine publishes Prometheus metrics, when its spec says."""
    exited: bool = False
    exit_code: int | None = None
    oom: OomCounter | None = None
    """Its cgroup's OOM-kill counter (``rbee.hive.oom``); it stays at 0 without a memory cgroup."""
    output: OutputTail | None = None
    """Where its stderr goes, for the last lines when it ends (``rbee.hive.stderr_tail``)."""
    started_at: float = field(default_factory=time.monotonic)
    stopping: bool = False
    """Set when the hive itself stops it: its SIGKILL after the grace period is no OOM kill."""
    last_exit: WorkerExit | None = None
    """How it ended; set once it has (before the ``exited`` or ``stopped`` announcement)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.instance)


WorkerListener = Callable[[str, Worker], None]
"""Called with ("spawned" | "exited" | "stopped", worker) whenever the set of workers changes."""


class ProcessMonitor:
    def __init__(self, backend: CgroupBackend) -> None:
        self.backend = backend
        self._workers: dict[tuple[str, str], Worker] = {}
        self._lock = threading.RLock()
        self._listeners: list[WorkerListener] = []

    def subscribe(self, listener: WorkerListener) -> None:
        self._listeners.append(listener)

    def _announce(self, event: str, worker: Worker) -> None:
        for listener in self._listeners:
            listener(event, worker)

    # -- spawning ---------------------------------------------------------------------------

    def spawn(
        self,
        group: str,
        instance: str,
        argv: Sequence[str],
        cpu_limit: str | None = None,
        memory_limit: str | int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        metrics_url: str | None = None,
    ) -> int:
        """Start ``argv`` in cgroup ``<root>/<group>/<instance>``; returns its PID.

        Raises SpawnError (LimitError for limits) or CgroupError; nothing is left behind then.
        """
        for label, value in (("group", group), ("instance", instance)):
            if not isinstance(value, str) or not NAME.match(value):
                raise SpawnError(
                    f"invalid {label} name {value!r}: use 1-64 letters, digits, '_', '.', '-'",
                    group=str(group), instance=str(instance),
                )
        if not argv:
            raise SpawnError("empty command line", group=group, instance=instance)
        limits = parse_limits(cpu_limit, memory_limit)
        binary = resolve_binary(argv[0], env)
        with self._lock:
            if (group, instance) in self._workers or (group, instance) in self.backend.enumerate():
                raise WorkerExistsError(f"worker {group}/{instance} already exists",
                                 group=group, instance=instance)
            placement = self.backend.create(group, instance, limits)
            output = None if log_path else OutputTail.unnamed()
            try:
                process = self._start(binary, argv, placement.procs_files, env, log_path,
                                      output)
            except BaseException:
                self.backend.remove(group, instance)
                if output is not None:
                    output.close()
                raise
            paths = self.backend.stat_paths(group, instance, process.pid)
            worker = Worker(
                group=group, instance=instance, pid=process.pid, argv=tuple(argv), limits=limits,
                limits_applied=placement.limits_applied,
                stats=StatSource(paths, process.pid),
                process=process, gpu_hint=gpu_indices_from_env(env),
                list_pids=partial(self.backend.pids, group, instance),
                cgroup_path=self.backend.cgroup_path(group, instance), metrics_url=metrics_url,
                oom=OomCounter(paths.oom_events),
                output=output if output is not None else OutputTail.of_file(log_path or ""),
            )
            if isinstance(self.backend, NoCgroup):
                self.backend.adopt(group, instance, process.pid)
            self._workers[worker.key] = worker
        if not placement.limits_applied:
            log.warning("%s/%s: limits %s are not enforced by the %s cgroup backend",
                        group, instance, limits, self.backend.name)
        self._announce("spawned", worker)
        return process.pid

    def _start(self, binary: str, argv: Sequence[str], procs_files: Sequence[str],
               env: Mapping[str, str] | None, log_path: str | None,
               stderr: OutputTail | None) -> subprocess.Popen[bytes]:
        """Start the worker: stdout and stderr to its log file, or stdout nowhere and stderr to
        ``stderr`` (an unnamed file the hive reads the last lines of)."""
        fds = []
        try:
            for path in procs_files:
                try:
                    fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
                except PermissionError as exc:
                    raise CgroupError(f"permission denied opening {path}", path=path) from exc

            def join_cgroup() -> None:  # runs in the child between fork and exec
                for fd in fds:
                    os.write(fd, b"0")

            try:
                output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
            except OSError as exc:
                raise SpawnError(f"cannot open the worker's log file {log_path}: "
                                 f"{exc.strerror}") from exc
            try:
                return subprocess.Popen(
                    [binary, *argv[1:]], executable=binary, preexec_fn=join_cgroup,
                    start_new_session=True, env=None if env is None else dict(env),
                    stdin=subprocess.DEVNULL, stdout=output,
                    stderr=output if stderr is None else stderr.fd,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
            finally:
                if output is not subprocess.DEVNULL:
                    output.close()
        finally:
            for fd in fds:
                os.close(fd)

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, group: str, instance: str, grace: float = 5.0) -> None:
        """SIGTERM every process of the worker, SIGKILL what is left after ``grace`` seconds, reap,
        and remove the cgroup. Raises NotFoundError for an unknown worker."""
        worker = self.get(group, instance)
        worker.stopping = True
        self._signal(worker, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive(worker):
            time.sleep(0.01)
        self._finish(worker)
        self._announce("stopped", worker)

    def stop_all(self, grace: float = 5.0) -> None:
        workers = self.workers()
        for worker in workers:
            worker.stopping = True
            self._signal(worker, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(self._alive(w) for w in workers):
            time.sleep(0.01)
        for worker in workers:
            self._finish(worker)
            self._announce("stopped", worker)

    def reap(self, worker: Worker) -> None:
        """Clean up after a worker whose main process has exited on its own."""
        if worker.key not in self._workers:
            return
        self._finish(worker)
        self._announce("exited", worker)

    def _signal(self, worker: Worker, sig: signal.Signals) -> None:
        if isinstance(self.backend, NoCgroup):
            try:
                os.killpg(worker.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        else:
            self.backend.kill(worker.group, worker.instance, sig)

    def _alive(self, worker: Worker) -> bool:
        if worker.process is not None:
            return worker.process.poll() is None or bool(self._members(worker))
        return bool(self._members(worker))

    def _members(self, worker: Worker) -> list[int]:
        if isinstance(self.backend, NoCgroup):
            return [worker.pid] if pid_running(worker.pid) else []
        return self.backend.pids(worker.group, worker.instance)

    def _finish(self, worker: Worker) -> None:
        """Kill what is left, reap, drop the cgroup and the open files. Idempotent."""
        with self._lock:
            if self._workers.get(worker.key) is not worker:
                return
            deadline = time.monotonic() + 5.0
            while self._alive(worker) and time.monotonic() < deadline:
                self._signal(worker, signal.SIGKILL)
                if worker.process is not None:
                    try:
                        worker.process.wait(timeout=0.05)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.01)
            if worker.process is not None:
                worker.exit_code = worker.process.poll()
            worker.exited = True
            worker.last_exit = ending(worker.pid, worker.exit_code, worker.oom, worker.output,
                                      time.monotonic() - worker.started_at, worker.stopping)
            worker.stats.close()
            del self._workers[worker.key]
            try:
                self.backend.remove(worker.group, worker.instance)
            except CgroupError as exc:
                log.warning("%s/%s: %s", worker.group, worker.instance, exc)

    # -- looking up -------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    def get(self, group: str, instance: str) -> Worker:
        try:
            return self._workers[(group, instance)]
        except KeyError:
            raise NotFoundError(f"no worker {group}/{instance}") from None

    def get_or_none(self, group: str, instance: str) -> Worker | None:
        return self._workers.get((group, instance))

    def enumerate(self) -> list[tuple[str, str, int]]:
        """(group, instance, main PID) of every worker cgroup with live processes under the root."""
        found = []
        for group, instance in self.backend.enumerate():
            pids = self.backend.pids(group, instance)
            if pids:
                found.append((group, instance, main_pid(pids)))
        return found

    def adopt_existing(self) -> list[Worker]:
        """Take over the workers a previous hive left running; remove cgroups left empty."""
        adopted = []
        with self._lock:
            for group, instance in self.backend.enumerate():
                if (group, instance) in self._workers:
                    continue
                pids = self.backend.pids(group, instance)
                if not pids:
                    self.backend.remove(group, instance)
                    continue
                pid = main_pid(pids)
                worker = Worker(
                    group=group, instance=instance, pid=pid, argv=read_cmdline(pid),
                    limits=self.backend.read_limits(group, instance), limits_applied=True,
                    stats=StatSource(paths := self.backend.stat_paths(group, instance, pid), pid),
                    list_pids=partial(self.backend.pids, group, instance),
                    cgroup_path=self.backend.cgroup_path(group, instance),
                    oom=OomCounter(paths.oom_events), output=OutputTail.of_process(pid),
                )
                self._workers[worker.key] = worker
                adopted.append(worker)
        for worker in adopted:
            self._announce("spawned", worker)
        return adopted

    def release(self) -> None:
        """Forget every worker without stopping it (hive restart: the next hive re-adopts them)."""
        with self._lock:
            for worker in self._workers.values():
                worker.stats.close()
                for handle in (worker.oom, worker.output):
                    if handle is not None:
                        handle.close()
            self._workers.clear()


def resolve_binary(program: str, env: Mapping[str, str] | None = None) -> str:
    """The absolute path of the worker binary, or a SpawnError saying what is wrong with it."""
    if "/" in program:
        path = program
        if not os.path.exists(path):
            raise SpawnError(f"worker binary not found: {program}")
    else:
        search = (env or {}).get("PATH") or os.environ.get("PATH", os.defpath)
        found = shutil.which(program, path=search)
        if found is None:
            if shutil.which(program, mode=os.F_OK, path=search):
                raise SpawnError(f"worker binary is not executable: {program}")
            raise SpawnError(f"worker binary not found on PATH: {program}")
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise SpawnError(f"worker binary is not executable: {program}")
    return os.path.abspath(path)


def gpu_indices_from_env(env: Mapping[str, str] | None) -> tuple[int, ...]:
    visible = (env or {}).get("CUDA_VISIBLE_DEVICES", "")
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    return tuple(int(part) for part in parts) if all(p.isdigit() for p in parts) else ()


def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    close = stat.rfind(b")")
    return stat[close + 2 : close + 3] not in (b"Z", b"X")


def main_pid(pids: list[int]) -> int:
    """The worker's main process: the one whose parent is outside the cgroup."""
    members = set(pids)
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) not in members:
            return pid
    return min(pids)
