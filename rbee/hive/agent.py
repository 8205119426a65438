"""The hive agent: owns the workers and produces a complete ``HiveHeartbeat`` every interval.

Everything runs in one trio nursery. Collection and the GPU refresh block (file reads, NVML,
nvidia-smi), so each runs in a worker thread with a limiter of one; the GPU refresh also runs under
``collect.refresh_timeout_s`` and is abandoned past it, so a hung driver delays nothing. Whoever
needs the heartbeat (the printer of ``rbee up``, the heartbeat sender, the HTTP API) reads
``latest`` or waits on ``wait_changed``, which also fires at once when a worker spawns or exits.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence

import httpx
import trio

from .. import __version__
from .._errors import NotFoundError, RbeeError, SpawnError
from ..config import HiveConfig, WorkerSpec
from ..plugin.manager import build_plugin_manager
from ..telemetry import (
    LONG_TEXT_CHARS,
    MAX_GPUS,
    SHORT_TEXT_CHARS,
    TAIL_LINE_CHARS,
    CollectorIssue,
    Degraded,
    HealthStatus,
    Healthy,
    HiveHeartbeat,
    HiveInfo,
    OperationalStatus,
    WorkerExit,
    cut,
    describe_health,
    fit_gpu,
    fit_worker,
    utc_now,
)
from .cgroups import select_backend
from .collection import TelemetryCollector
from .monitor import ProcessMonitor, Worker, open_pidfd
from .origins import OriginPools
from .supervisor import Lifecycle, Supervisor, restart_wanted

__all__ = ["HiveAgent", "free_port", "restart_wanted"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a worker whose spec says ``{port}``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class HiveAgent:
    def __init__(self, config: HiveConfig, extra_plugins: Sequence[object] = ()) -> None:
        self.config = config
        backend = select_backend(config.cgroup.backend, config.cgroup.root,
                                 config.cgroup.io_counters, hive_id=config.id)
        self.monitor = ProcessMonitor(backend)
        self.started = False
        """Whether ``run`` began: until then the cgroup root prepared here is its own to remove."""
        self.collector = TelemetryCollector(
            self.monitor,
            build_plugin_manager(config.collect.disabled_plugins, extra_plugins),
            config.collect,
        )
        self.status = OperationalStatus.STARTING
        self.port = config.port
        self._refresh_issue: CollectorIssue | None = None
        self._sample_issue: CollectorIssue | None = None
        self.latest = self._heartbeat([])
        self.generation = 0
        """Increases with every new ``latest``: a reader that remembers it misses nothing."""
        self._changed = trio.Event()
        self._collect_limiter = trio.CapacityLimiter(1)
        self._refresh_limiter = trio.CapacityLimiter(1)
        self._sample_limiter = trio.CapacityLimiter(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.supervisor = Supervisor()
        """Workers to keep running (the config's and those spawned through the API)."""
        self._supervision = threading.Lock()
        """The supervisor is told of spawns and exits in the thread that saw them (so a
        heartbeat built after a reap already lists the worker as down) and read in trio."""
        self.monitor.subscribe(self._on_worker_change)

    # -- change notification --------------------------------------------------------------

    def _on_worker_change(self, event: str, worker: Worker) -> None:
        """Called from whichever thread spawned, stopped or reaped: tell the supervisor, wake
        the agent's loop, watch a new worker for its exit, and schedule the restart of one that
        exited if its policy says so."""
        log.info("worker %s/%s %s (pid %d)", worker.group, worker.instance, event, worker.pid)
        delay = None
        if event == "spawned":
            with self._supervision:
                self.supervisor.started(worker.key)
        elif event == "exited" and worker.last_exit is not None and not worker.stopping:
            delay = self._ended(worker.key, worker.last_exit,
                                worker.oom.last if worker.oom is not None else 0)
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._wake, event, worker, delay)
            except trio.RunFinishedError:
                pass

    def _ended(self, key: tuple[str, str], ending: WorkerExit, oom_kills: int) -> float | None:
        with self._supervision:
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

    def _wake(self, event: str, worker: Worker, delay: float | None) -> None:
        self._wake_event.set()
        if self._nursery is None:
            return
        if event == "spawned":
            self._nursery.start_soon(self._watch_exit, worker.pid)
        elif delay is not None:
            life = self.supervisor.lives.get(worker.key)
            if life is not None:
                self._nursery.start_soon(self._restart_later, life, life.attempts, delay)

    async def _restart_later(self, life: Lifecycle, attempt: int, delay: float) -> None:
        """Start a worker again after its backoff (``rbee.hive.supervisor``), unless it was
        deleted or spawned anew meanwhile. A restart that cannot spawn counts as a failure."""
        await trio.sleep(delay)
        key = (life.group, life.instance)
        if (self.supervisor.lives.get(key) is not life or life.attempts != attempt
                or life.spec is None or self.monitor.get_or_none(*key) is not None):
            return
        try:
            await self._spawn_now(life.spec)
        except RbeeError as exc:
            ending = WorkerExit(at=utc_now(), pid=0,
                                stderr_tail=[cut(f"cannot start: {exc}", TAIL_LINE_CHARS)])
            delay = self._ended(key, ending, 0)
            self._wake_event.set()
            if delay is not None:
                self._nursery.start_soon(self._restart_later, life, life.attempts, delay)

    async def _watch_exit(self, pid: int) -> None:
        """Wake the loop the moment a worker's main process exits (its own pidfd, polled by trio),
        so its exit reaches the heartbeat at once instead of at the next tick."""
        pidfd = open_pidfd(pid)
        if pidfd < 0:
            return  # no pidfd on this kernel: the next tick notices the exit
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        self._wake_event.set()

    async def wait_changed(self) -> HiveHeartbeat:
        """Wait for the next heartbeat snapshot (tick or worker change) and return it."""
        await self._changed.wait()
        return self.latest

    async def wait_newer(self, generation: int) -> tuple[int, HiveHeartbeat]:
        """The latest snapshot once it is newer than ``generation`` (at once if it already is),
        with its own generation."""
        while self.generation <= generation:
            await self._changed.wait()
        return self.generation, self.latest

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._wake_event = trio.Event()
        self.started = True
        self.monitor.backend.claim()  # before adopting: another live hive's workers are not ours
        try:
            adopted = await trio.to_thread.run_sync(self.monitor.adopt_existing)
            for worker in adopted:
                log.info("re-adopted worker %s/%s (pid %d)", worker.group, worker.instance,
                         worker.pid)
            await self._start_configured(self.config.workers)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for worker in self.monitor.workers():
                    nursery.start_soon(self._watch_exit, worker.pid)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._sample_loop)
                nursery.start_soon(self._refresh_workers_loop)
                self.status = OperationalStatus.READY
                await self._publish()
                task_status.started()
                nursery.start_soon(self._collect_loop)
        finally:
            self.status = OperationalStatus.STOPPING
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _start_configured(self, specs: Sequence[WorkerSpec]) -> None:
        """Start the config's workers that are not already running (re-adopted). One that cannot
        start is logged and left out; the hive and the other workers carry on."""
        for spec in specs:
            self.supervisor.keep(spec)
            adopted = self.monitor.get_or_none(spec.group, spec.instance)
            if adopted is not None:
                if spec.metrics_url and "{port}" not in spec.metrics_url:
                    adopted.metrics_url = spec.metrics_url
                continue
            try:
                await self._spawn_now(spec)
            except SpawnError as exc:
                log.error("worker %s/%s from the config not started: %s", spec.group,
                          spec.instance, exc)

    async def spawn(self, spec: WorkerSpec) -> int:
        """Start a worker and keep it running by its restart policy until ``stop_worker``. A
        worker of that name that is down (waiting to restart, or ended) is replaced."""
        key = (spec.group, spec.instance)
        with self._supervision:  # kept before it starts: an exit at once finds its policy
            live = self.monitor.get_or_none(*key) is not None
            previous = None if live else self.supervisor.lives.pop(key, None)
            if not live:
                self.supervisor.keep(spec)
        try:
            return await self._spawn_now(spec)  # a live one: "already exists", nothing changed
        except BaseException:
            if not live:
                with self._supervision:
                    self.supervisor.forget(key)
                    if previous is not None:
                        self.supervisor.lives[key] = previous
            raise

    async def _spawn_now(self, spec: WorkerSpec) -> int:
        port = str(free_port()) if any("{port}" in a for a in (*spec.argv, spec.metrics_url or "")
                                       ) else ""
        argv = [arg.replace("{python}", sys.executable).replace("{port}", port)
                for arg in spec.argv]
        metrics_url = spec.metrics_url.replace("{port}", port) if spec.metrics_url else None
        env = dict(spec.env) if spec.env else None
        log_path = (f"{self.config.log_dir}/{spec.group}-{spec.instance}.log"
                    if self.config.log_dir else None)
        return await trio.to_thread.run_sync(
            lambda: self.monitor.spawn(spec.group, spec.instance, argv, spec.cpu_limit,
                                       spec.memory_limit, env, log_path, metrics_url))

    async def stop_worker(self, group: str, instance: str) -> None:
        """Stop a worker and stop keeping it. One that has no process now (waiting to restart,
        or ended) is only forgotten: that is a success too. NotFoundError for an unknown one."""
        with self._supervision:
            kept = self.supervisor.forget((group, instance))
        try:
            await trio.to_thread.run_sync(self.monitor.stop, group, instance,
                                          self.config.stop_grace_s)
        except NotFoundError:
            if not kept:
                raise
            self._wake_event.set()  # it had no process: the next heartbeat drops it

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_issue = await self._off_loop(
                self.collector.refresh_devices, self._refresh_limiter, "device refresh")
            await trio.sleep(self.config.collect.interval_s)

    async def _refresh_workers_loop(self) -> None:
        """The plugins' async per-worker refresh (engine metrics), on its own cadence: it never
        delays a collection tick, and the tick reads whatever it last stored. One HTTP client (a
        small pool per origin, ``OriginPools``) serves every plugin for the hive's life and is
        closed when the hive stops."""
        settings = self.config.collect
        async with httpx.AsyncClient(transport=OriginPools(), timeout=settings.engine.timeout_s,
                                     trust_env=False) as http:
            while True:
                next_at = trio.current_time() + settings.interval_s
                await self.collector.refresh_workers(http, settings.refresh_timeout_s)
                await trio.sleep_until(next_at)

    async def _sample_loop(self) -> None:
        """Per-process GPU utilisation, once per tick on a thread of its own: at 1.4-2.6 ms a GPU
        it must not sit on the refresh's path. The next sample starts one interval after the
        last one started, so the figures are never older than a tick plus one sample's cost."""
        interval = self.config.collect.interval_s
        while True:
            started = trio.current_time()
            self._sample_issue = await self._off_loop(
                self.collector.sample_devices, self._sample_limiter, "GPU sample")
            await trio.sleep_until(started + interval)

    async def _off_loop(self, work, limiter: trio.CapacityLimiter, what: str
                        ) -> CollectorIssue | None:
        """Run blocking device work in a thread under ``refresh_timeout_s``; past it the work is
        abandoned (a hung driver delays nothing) and reported."""
        timeout = self.config.collect.refresh_timeout_s
        with trio.move_on_after(timeout) as scope:
            await trio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("%s took longer than %gs; going on without it", what, timeout)
            return CollectorIssue(collector="refresh",
                                  message=f"{what} took longer than {timeout:g}s")
        return None

    async def _collect_loop(self) -> None:
        interval = self.config.heartbeat.interval_s
        while True:
            with trio.move_on_after(interval):
                await self._wake_event.wait()
            self._wake_event = trio.Event()
            await self._publish()

    async def _publish(self) -> None:
        records = await trio.to_thread.run_sync(self.collector.collect_all,
                                                limiter=self._collect_limiter)
        with self._supervision:
            records = self.supervisor.records(records)
        self.latest = self._heartbeat(records)
        self.generation += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _heartbeat(self, workers) -> HiveHeartbeat:
        """The snapshot, cut to the contract's bounds: a plugin's or a driver's excess costs
        its own field, never the delivery of the whole heartbeat."""
        for worker in workers:
            fit_worker(worker)
        devices = self.collector.devices_now()[:MAX_GPUS]
        for device in devices:
            fit_gpu(device)
        return HiveHeartbeat(
            hive=HiveInfo(id=self.config.id, hostname=cut(socket.gethostname(), SHORT_TEXT_CHARS),
                          port=self.port, operational_status=self.status,
                          health_status=self.health(), version=__version__),
            timestamp=utc_now(), workers=workers, capabilities=devices)

    def farewell(self) -> HiveHeartbeat:
        """The last heartbeat of a hive that stopped its workers: status stopped, no workers."""
        self.status = OperationalStatus.STOPPED
        return self._heartbeat([])

    def health(self) -> HealthStatus:
        """Degraded, with every reason, when a refresh or sample failed or ran late, a plugin
        overran its per-tick budget, or a GPU is not healthy (scheduling queries also skip
        workers on an unhealthy GPU)."""
        issues = [*self.collector.refresh_errors, *self.collector.sample_errors,
                  *self.collector.worker_refresh_errors]
        issues += [issue for issue in (self._refresh_issue, self._sample_issue) if issue]
        issues += [CollectorIssue(collector=name, message=f"over its per-tick budget ({ms} ms)")
                   for name, ms in self.collector.over_budget.items()]
        reasons = [f"{i.collector}: {i.message}" for i in issues]
        reasons += [f"GPU {d.index} ({d.uuid}) {describe_health(d.health)}"
                    for d in self.collector.devices if not isinstance(d.health, Healthy)]
        return (Degraded(reason=cut("; ".join(reasons), LONG_TEXT_CHARS)) if reasons
                else Healthy())

    async def _shutdown(self) -> None:
        if self.config.stop_workers_on_exit:
            await trio.to_thread.run_sync(self.monitor.stop_all, self.config.stop_grace_s)
            self.monitor.backend.remove_root()
        else:
            self.monitor.release()
        self.monitor.backend.unclaim()
        self.collector.close()
        self.status = OperationalStatus.STOPPED
