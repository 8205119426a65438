"""ProcessMonitor: spawns workers into their own cgroups, stops them, re-adopts them after a restart.

A worker's own program runs only inside its cgroup. It starts as a small helper (``/bin/sh``
running ``JOIN_THEN_EXEC``) that writes its own PID into the cgroup's ``cgroup.procs`` files and
then ``exec``s the worker binary under the same PID; only the helper's start is charged to the
hive's cgroup (a shell's: under a millisecond of CPU, about 100 KB of memory of its own).
``spawn`` returns, and announces the worker, as soon as the helper runs, without waiting for it
to join: joining a cgroup (any write to ``cgroup.procs``) takes the kernel's global
``cgroup_threadgroup_rwsem`` for writing, which waits out an RCU grace period whenever no other
migration ran just before (14 ms at the median on the 2-core test machine), and the hive's
heartbeat need not wait for that. A worker signalled before it has joined (a stop right after its
spawn) gets the signal directly: the helper dies and the worker never starts. Without cgroups
(the none backend) the worker binary is started directly. Workers get a session of their own,
so a Ctrl-C meant for the hive does not reach them, and a restarted hive finds them again.

What the backend answers differently (how to signal a worker, which of its processes still run)
is the backend's to say (``CgroupBackend.kill``, ``members``, ``adopt``). Whoever watches the set
of workers subscribes to ``WorkerEvent``s. The methods block (stop waits out a grace period, a
reap kills what a worker left behind); the trio hive calls them in worker threads, never on the
collection tick's.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from .._errors import CgroupError, NotFoundError, SpawnError, WorkerExistsError
from ..contract import WorkerExit
from ..limits import Limits, parse_limits
from .cgroups import CgroupBackend, StatPaths
from .exits import ending
from .launch import gpu_indices_from_env, resolve_binary
from .oom import OomCounter
from .procfs import main_pid, read_cmdline
from .stderr_tail import OutputTail

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FINISH_S = 5.0
"""How long a reap or stop keeps killing what a worker left in its cgroup before giving up."""
SHELL = "/bin/sh"
JOIN_THEN_EXEC = ('while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
                  'exec "$@"')
"""The helper a worker starts as: it writes its own PID into each of its cgroup's
``cgroup.procs`` files (the arguments before ``--``), then becomes the worker (``exec``, same PID).
Exit status 125, and the shell's words on the worker's stderr, if a write fails: the worker then
never ran."""


def program_argv(cmdline: Sequence[str]) -> tuple[str, ...]:
    """A worker's command line as its spec gave it: a worker still in its helper (``/proc``
    shows the shell) is named by the command the helper is about to ``exec``."""
    if tuple(cmdline[:3]) == (SHELL, "-c", JOIN_THEN_EXEC) and "--" in cmdline[4:]:
        return tuple(cmdline[cmdline.index("--", 4) + 1:])
    return tuple(cmdline)


class WorkerEvent(enum.Enum):
    """How the set of workers changed."""

    SPAWNED = "spawned"
    """Started by this hive, or re-adopted from a previous one."""
    EXITED = "exited"
    """Its main process ended on its own; it is reaped and its cgroup removed."""
    STOPPED = "stopped"
    """The hive stopped it on purpose; reaped and removed."""


@dataclass(eq=False)
class Worker:
    """One worker process the hive looks after: what it is, where it runs, how it ended."""

    group: str
    instance: str
    pid: int
    argv: tuple[str, ...]
    limits: Limits
    limits_applied: bool
    stat_paths: StatPaths
    """Where its counters are read (the collector opens them: ``rbee.hive.sampling``)."""
    process: subprocess.Popen[bytes] | None = None
    """None for a worker re-adopted after a hive restart: it is not our child."""
    gpu_hint: tuple[int, ...] = ()
    """GPU indices from the worker's CUDA_VISIBLE_DEVICES, used until NVML sees its processes."""
    list_pids: Callable[[], list[int]] = list
    """Every PID in the worker's cgroup, children included (only the main PID without one)."""
    cgroup_path: str | None = None
    cgroup_paths: dict[str, str] = field(default_factory=dict)
    """Its cgroup directory per controller (``CgroupBackend.cgroup_paths``)."""
    metrics_url: str | None = None
    """Where the worker's engine publishes Prometheus metrics, when its spec says."""
    endpoint: str | None = None
    """Where its inference requests go (its spec's ``endpoint``), for its records."""
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
    """How it ended; set once it has (before the ``EXITED`` or ``STOPPED`` announcement)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.instance)


WorkerListener = Callable[[WorkerEvent, Worker], None]
"""Called whenever the set of workers changes, in the thread that changed it."""


class ProcessMonitor:
    def __init__(self, backend: CgroupBackend) -> None:
        self.backend = backend
        self._workers: dict[tuple[str, str], Worker] = {}
        self._finishing: dict[tuple[str, str], threading.Event] = {}
        """Workers a reap or stop is finishing now, each event set once it is done: a spawn of
        the same name waits for it."""
        self._lock = threading.RLock()
        self._listeners: list[WorkerListener] = []

    def subscribe(self, listener: WorkerListener) -> None:
        self._listeners.append(listener)

    def _announce(self, event: WorkerEvent, worker: Worker) -> None:
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
        endpoint: str | None = None,
    ) -> int:
        """Start ``argv`` in cgroup ``<root>/<group>/<instance>``; returns its PID.

        Raises SpawnError (LimitError for limits, WorkerExistsError for a name in use) or
        CgroupError; nothing is left behind then.
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
        with self._free((group, instance)):
            cgroup = self.backend.cgroup_path(group, instance)  # one stat, not a walk of them all
            if (group, instance) in self._workers or (cgroup is not None and os.path.isdir(cgroup)):
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
                limits_applied=placement.limits_applied, stat_paths=paths,
                process=process, gpu_hint=gpu_indices_from_env(env),
                list_pids=partial(self.backend.pids, group, instance),
                cgroup_path=self.backend.cgroup_path(group, instance), metrics_url=metrics_url,
                endpoint=endpoint, cgroup_paths=self.backend.cgroup_paths(group, instance),
                oom=OomCounter(paths.oom_events),
                output=output if output is not None else OutputTail.of_file(log_path or ""),
            )
            self.backend.adopt(group, instance, process.pid)
            self._workers[worker.key] = worker
        if not placement.limits_applied:
            log.warning("%s/%s: limits %s are not enforced by the %s cgroup backend",
                        group, instance, limits, self.backend.name)
        self._announce(WorkerEvent.SPAWNED, worker)
        return process.pid

    @contextmanager
    def _free(self, key: tuple[str, str]) -> Iterator[None]:
        """The monitor's lock, once no reap or stop is finishing a worker of that name (a
        restart waits for its predecessor's cgroup to be gone, as it did under one lock)."""
        while True:
            with self._lock:
                finishing = self._finishing.get(key)
                if finishing is None:
                    yield
                    return
            finishing.wait()

    def _start(self, binary: str, argv: Sequence[str], procs_files: Sequence[str],
               env: Mapping[str, str] | None, log_path: str | None,
               stderr: OutputTail | None) -> subprocess.Popen[bytes]:
        """Start the worker: stdout and stderr to its log file, or stdout nowhere and stderr to
        ``stderr`` (an unnamed file the hive reads the last lines of). With cgroup files to
        join, through ``JOIN_THEN_EXEC``: the call returns once that helper runs, before it has
        joined (see the module's docstring)."""
        for path in procs_files:  # a clear error now, not an exit status later
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            except PermissionError as exc:
                raise CgroupError(f"permission denied opening {path}", path=path) from exc
            except OSError as exc:
                raise CgroupError(f"cannot open {path}: {exc.strerror}", path=path) from exc
        command = [binary, *argv[1:]]
        if procs_files:
            command = [SHELL, "-c", JOIN_THEN_EXEC, "rbee-join", *procs_files, "--", *command]
        try:
            output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        except OSError as exc:
            raise SpawnError(f"cannot open the worker's log file {log_path}: "
                             f"{exc.strerror}") from exc
        try:
            return subprocess.Popen(
                command, executable=command[0], start_new_session=True,
                env=None if env is None else dict(env), stdin=subprocess.DEVNULL, stdout=output,
                stderr=output if stderr is None else stderr.fd,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
        finally:
            if output is not subprocess.DEVNULL:
                output.close()

    # -- stopping and reaping ---------------------------------------------------------------

    def stop(self, group: str, instance: str, grace: float = 5.0) -> None:
        """SIGTERM every process of the worker, SIGKILL what is left after ``grace`` seconds, reap,
        and remove the cgroup. Raises NotFoundError for an unknown worker."""
        worker = self.get(group, instance)
        worker.stopping = True
        self._kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive(worker):
            time.sleep(0.01)
        self._finish(worker)

    def stop_all(self, grace: float = 5.0) -> None:
        workers = self.workers()
        for worker in workers:
            worker.stopping = True
            self._kill(worker, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(self._alive(w) for w in workers):
            time.sleep(0.01)
        for worker in workers:
            self._finish(worker)

    def reap(self, worker: Worker) -> bool:
        """Clean up after a worker whose main process has exited on its own; False when it was
        already reaped (or stopped, or is being finished by another thread)."""
        return self._finish(worker)

    def _kill(self, worker: Worker, sig: signal.Signals) -> None:
        """Signal every process of the worker, and its main process directly while that is not
        among its cgroup's members yet (the helper, in its first milliseconds)."""
        process = worker.process
        if process is not None and process.poll() is None \
                and worker.pid not in self.backend.members(worker.group, worker.instance):
            process.send_signal(sig)
        self.backend.kill(worker.group, worker.instance, sig)

    def _alive(self, worker: Worker) -> bool:
        if worker.process is not None and worker.process.poll() is None:
            return True
        return bool(self.backend.members(worker.group, worker.instance))

    def _finish(self, worker: Worker) -> bool:
        """Kill what is left, reap, drop the cgroup and the open files, then announce it
        (``STOPPED`` if the hive was stopping it, else ``EXITED``). The first caller for a worker
        does it; another one waits until it is done and announced, then returns False, so
        whoever returns from here finds the worker's ending recorded. The kill loop (up to
        ``FINISH_S``) runs without the monitor's lock: listing workers never waits for it."""
        key = worker.key
        with self._lock:
            running = self._finishing.get(key)
            if running is None:
                if self._workers.get(key) is not worker:
                    return False
                running = self._finishing[key] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            running.wait()
            return False
        try:
            try:
                self._end(worker)
                try:
                    self.backend.remove(worker.group, worker.instance)
                except CgroupError as exc:
                    log.warning("%s/%s: %s", worker.group, worker.instance, exc)
            finally:
                with self._lock:
                    del self._workers[key]
            self._announce(WorkerEvent.STOPPED if worker.stopping else WorkerEvent.EXITED,
                           worker)
        finally:
            with self._lock:
                del self._finishing[key]
            running.set()
        return True

    def _end(self, worker: Worker) -> None:
        """SIGKILL what is left of the worker (for up to ``FINISH_S``), then record how it
        ended."""
        deadline = time.monotonic() + FINISH_S
        while self._alive(worker) and time.monotonic() < deadline:
            self._kill(worker, signal.SIGKILL)
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
                pids = self.backend.pids(group, instance) or self._remove_empty(group, instance)
                if not pids:
                    continue
                pid = main_pid(pids)
                paths = self.backend.stat_paths(group, instance, pid)
                worker = Worker(
                    group=group, instance=instance, pid=pid, argv=program_argv(read_cmdline(pid)),
                    limits=self.backend.read_limits(group, instance), limits_applied=True,
                    stat_paths=paths, list_pids=partial(self.backend.pids, group, instance),
                    cgroup_path=self.backend.cgroup_path(group, instance),
                    cgroup_paths=self.backend.cgroup_paths(group, instance),
                    oom=OomCounter(paths.oom_events), output=OutputTail.of_process(pid),
                )
                self.backend.adopt(group, instance, pid)
                self._workers[worker.key] = worker
                adopted.append(worker)
        for worker in adopted:
            self._announce(WorkerEvent.SPAWNED, worker)
        return adopted

    def _remove_empty(self, group: str, instance: str) -> list[int]:
        """Remove a worker cgroup found empty; the PIDs in it if a worker's helper joined it
        meanwhile (a hive restarted while spawning), which is then adopted instead."""
        try:
            self.backend.remove(group, instance)
        except CgroupError:
            pids = self.backend.pids(group, instance)
            if not pids:
                raise
            return pids
        return []

    def release(self) -> None:
        """Forget every worker without stopping it (hive restart: the next hive re-adopts them)."""
        with self._lock:
            for worker in self._workers.values():
                for handle in (worker.oom, worker.output):
                    if handle is not None:
                        handle.close()
            self._workers.clear()
