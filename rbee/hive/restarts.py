"""Keeping workers running: the trio side of restart supervision. ``Keeper`` starts the config's
workers and the API's, tells the ``Supervisor`` (``rbee.hive.supervisor``: desired specs and the
restart policy) of every spawn and exit in the thread that saw it, and restarts a failed worker
after the backoff the policy gives, unless it was deleted or spawned anew meanwhile."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import trio

from .._errors import NotFoundError, RbeeError, SpawnError
from ..config import WorkerSpec
from ..contract import TAIL_LINE_CHARS, WorkerExit, WorkerTelemetry, cut, utc_now
from .launch import adopted_urls, launch_of
from .processes import ProcessMonitor, Worker, WorkerEvent
from .supervisor import Lifecycle, Supervisor

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Keeper:
    def __init__(self, monitor: ProcessMonitor, log_dir: str | None, stop_grace_s: float,
                 wake: Callable[[], None]) -> None:
        self.monitor = monitor
        self.log_dir = log_dir
        self.stop_grace_s = stop_grace_s
        self.wake = wake
        """Called when a change must reach the heartbeat (a worker forgotten, a restart failed)."""
        self.supervisor = Supervisor()
        """Workers to keep running (the config's and those spawned through the API)."""
        self._lock = threading.Lock()
        """The supervisor is told of spawns and exits in the thread that saw them (so a
        heartbeat built after a reap already lists the worker as down) and read in trio."""

    # -- told by the monitor, in the thread that saw it -----------------------------------

    def record(self, event: WorkerEvent, worker: Worker) -> float | None:
        """Tell the supervisor; the delay before a restart when a kept worker ended on its own
        and its policy restarts it, else None."""
        if event is WorkerEvent.SPAWNED:
            with self._lock:
                self.supervisor.started(worker.key)
        elif event is WorkerEvent.EXITED and worker.last_exit is not None:
            return self._ended(worker.key, worker.last_exit,
                               worker.oom.last if worker.oom is not None else 0)
        return None

    def _ended(self, key: Key, ending: WorkerExit, oom_kills: int) -> float | None:
        with self._lock:
            delay = self.supervisor.ended(key, ending, oom_kills)
            life = self.supervisor.lives[key]
        how = ("OOM-killed" if ending.oom_killed else f"killed by {ending.signal}"
               if ending.signal else f"exited with status {ending.exit_code}"
               if ending.exit_code is not None else "exited")
        last = f"; last stderr: {ending.stderr_tail[-1]!r}" if ending.stderr_tail else ""
        if delay is None:
            log.warning("worker %s/%s %s after %.1fs; not restarted (%s)%s", *key, how,
                        ending.ran_s, life.state, last)
        else:
            log.warning("worker %s/%s %s after %.1fs; restart %d in %.1fs (%s, policy %s)%s",
                        *key, how, ending.ran_s, life.restarts + 1, delay, life.state,
                        life.spec.restart if life.spec else "-", last)
        return delay

    def down_keys(self) -> frozenset[Key]:
        with self._lock:
            return self.supervisor.down_keys()

    def records(self, live: list[WorkerTelemetry], down_before: frozenset[Key]
                ) -> list[WorkerTelemetry]:
        with self._lock:
            return self.supervisor.records(live, down_before)

    # -- in trio ----------------------------------------------------------------------------

    def restart_later(self, nursery: trio.Nursery, key: Key, delay: float) -> None:
        life = self.supervisor.lives.get(key)
        if life is not None:
            nursery.start_soon(self._restart_later, nursery, life, life.attempts, delay)

    async def _restart_later(self, nursery: trio.Nursery, life: Lifecycle, attempt: int,
                             delay: float) -> None:
        """Start a worker again after its backoff, unless it was deleted or spawned anew
        meanwhile. A restart that cannot spawn counts as a failure."""
        await trio.sleep(delay)
        key = (life.group, life.instance)
        if (self.supervisor.lives.get(key) is not life or life.attempts != attempt
                or life.spec is None or self.monitor.get_or_none(*key) is not None):
            return
        try:
            await self.spawn_now(life.spec)
        except RbeeError as exc:
            ending = WorkerExit(at=utc_now(), pid=0,
                                stderr_tail=[cut(f"cannot start: {exc}", TAIL_LINE_CHARS)])
            delay_again = self._ended(key, ending, 0)
            self.wake()
            if delay_again is not None:
                nursery.start_soon(self._restart_later, nursery, life, life.attempts,
                                   delay_again)

    async def start_configured(self, specs: Sequence[WorkerSpec]) -> None:
        """Start the config's workers that are not already running (re-adopted). One that cannot
        start is logged and left out; the hive and the other workers carry on."""
        for spec in specs:
            self.supervisor.keep(spec)
            adopted = self.monitor.get_or_none(spec.group, spec.instance)
            if adopted is not None:
                metrics_url, adopted.endpoint = adopted_urls(spec, adopted.argv)
                adopted.metrics_url = metrics_url or adopted.metrics_url
                continue
            try:
                await self.spawn_now(spec)
            except SpawnError as exc:
                log.error("worker %s/%s from the config not started: %s", spec.group,
                          spec.instance, exc)

    async def spawn(self, spec: WorkerSpec) -> int:
        """Start a worker and keep it running by its restart policy until ``stop``. A worker of
        that name that is down (waiting to restart, or ended) is replaced."""
        key = (spec.group, spec.instance)
        with self._lock:  # kept before it starts: an exit at once finds its policy
            live = self.monitor.get_or_none(*key) is not None
            previous = None if live else self.supervisor.lives.pop(key, None)
            if not live:
                self.supervisor.keep(spec)
        try:
            return await self.spawn_now(spec)  # a live one: WorkerExistsError, nothing changed
        except BaseException:
            if not live:
                with self._lock:
                    self.supervisor.forget(key)
                    if previous is not None:
                        self.supervisor.lives[key] = previous
            raise

    async def spawn_now(self, spec: WorkerSpec) -> int:
        launch = launch_of(spec, self.log_dir)
        return await trio.to_thread.run_sync(
            lambda: self.monitor.spawn(spec.group, spec.instance, launch.argv, spec.cpu_limit,
                                       spec.memory_limit, launch.env, launch.log_path,
                                       launch.metrics_url, launch.endpoint))

    async def stop(self, group: str, instance: str) -> None:
        """Stop a worker and stop keeping it. One that has no process now (waiting to restart,
        or ended) is only forgotten: that is a success too. NotFoundError for an unknown one."""
        with self._lock:
            kept = self.supervisor.forget((group, instance))
        try:
            await trio.to_thread.run_sync(self.monitor.stop, group, instance, self.stop_grace_s)
        except NotFoundError:
            if not kept:
                raise
            self.wake()  # it had no process: the next heartbeat drops it

