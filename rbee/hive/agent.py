"""The hive agent: owns the workers and produces a complete ``HiveHeartbeat`` every interval.

Everything runs in one trio nursery. The agent wires the parts, each with one job: the process
monitor (``processes``: spawn, stop, adopt, reap), restart supervision (``restarts`` over
``supervisor``'s policy), collection through the plugins (``collection``), the device and engine
loops (``device_loops``) and the snapshot (``snapshot``: heartbeat and health). Collection blocks
(file reads), so each tick runs in a worker thread with a limiter of one; a worker found exited is
reaped in a thread of its own, never on the tick. Whoever needs the heartbeat (the printer of
``rbee up``, the heartbeat sender, the HTTP API) reads ``latest`` or waits on ``wait_changed``,
which also fires at once when a worker spawns or exits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import msgspec
import trio

from ..config import HiveConfig, WorkerSpec
from ..contract import (
    CollectorIssue,
    EngineState,
    HealthStatus,
    HiveHeartbeat,
    OperationalStatus,
    utc_now,
)
from ..plugin.manager import build_plugin_manager
from . import snapshot
from .cgroups import select_backend
from .collection import TelemetryCollector
from .device_loops import DeviceLoops
from .engine_poll import COLLECTOR as ENGINE_COLLECTOR
from .launch import free_port
from .processes import ProcessMonitor, Worker, WorkerEvent
from .procfs import open_pidfd
from .restarts import Keeper
from .supervisor import Supervisor, restart_wanted

__all__ = ["HiveAgent", "free_port", "restart_wanted"]

log = logging.getLogger(__name__)


class HiveAgent:
    def __init__(self, config: HiveConfig, extra_plugins: Sequence[object] = ()) -> None:
        self.config = config
        backend = select_backend(config.cgroup.backend, config.cgroup.root,
                                 config.cgroup.io_counters, hive_id=config.id)
        self.monitor = ProcessMonitor(backend)
        self.started = False
        """Whether ``run`` began: until then the cgroup root prepared here is its own to remove."""
        self._gone: list[Worker] = []
        """Workers a tick found exited, reaped by the agent after the tick (``_publish``)."""
        self.collector = TelemetryCollector(
            self.monitor,
            build_plugin_manager(config.collect.disabled_plugins, extra_plugins),
            config.collect, on_gone=self._gone.append, plugin_config=config.plugins,
        )
        self.loops = DeviceLoops(self.collector, config.collect, self.patch_engines)
        self.keeper = Keeper(self.monitor, config.log_dir, config.stop_grace_s, self._wake_now)
        self.status = OperationalStatus.STARTING
        self.port = config.port
        self.latest = self._heartbeat([])
        self.generation = 0
        """Increases with every new ``latest``: a reader that remembers it misses nothing."""
        self._changed = trio.Event()
        self._patched_since: dict[tuple[str, str], EngineState | str] | None = None
        """Engine changes patched in while a collection runs (``_publish``), else None."""
        self._wake_event = trio.Event()
        self._begun = self._published = 0
        """Snapshots begun, and the last one published (``_publish``; one runs at a time)."""
        self._collect_limiter = trio.CapacityLimiter(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.monitor.subscribe(self._on_worker_change)

    @property
    def supervisor(self) -> Supervisor:
        return self.keeper.supervisor

    # -- change notification --------------------------------------------------------------

    def _on_worker_change(self, event: WorkerEvent, worker: Worker) -> None:
        """Called from whichever thread spawned, stopped or reaped: tell the keeper, then wake
        the agent's loop, watch a new worker for its exit, and schedule the restart of one that
        exited if its policy says so."""
        log.info("worker %s/%s %s (pid %d)", worker.group, worker.instance, event.value,
                 worker.pid)
        delay = self.keeper.record(event, worker)
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._wake, event, worker, delay)
            except trio.RunFinishedError:
                pass

    def _wake_now(self) -> None:
        self._wake_event.set()

    def _wake(self, event: WorkerEvent, worker: Worker, delay: float | None) -> None:
        self._wake_event.set()
        if self._nursery is None:
            return
        if event is WorkerEvent.SPAWNED:
            self._nursery.start_soon(self._watch_exit, worker)
        elif delay is not None:
            self.keeper.restart_later(self._nursery, worker.key, delay)

    async def _watch_exit(self, worker: Worker) -> None:
        """Reap a worker the moment its main process exits (its own pidfd, polled by trio), so
        its exit reaches the heartbeat at once instead of at the next tick."""
        pidfd = open_pidfd(worker.pid)
        if pidfd < 0:
            return  # no pidfd on this kernel: the next tick notices the exit
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        await self._reap(worker)

    async def _reap(self, worker: Worker) -> None:
        """Reap in a thread of its own: killing what a worker left behind can take seconds."""
        await trio.to_thread.run_sync(self.monitor.reap, worker)
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
            await self.keeper.start_configured(self.config.workers)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for worker in self.monitor.workers():
                    nursery.start_soon(self._watch_exit, worker)
                self.loops.start(nursery)
                self.status = OperationalStatus.READY
                await self._publish()
                task_status.started()
                nursery.start_soon(self._collect_loop)
        finally:
            self.status = OperationalStatus.STOPPING
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def spawn(self, spec: WorkerSpec) -> int:
        """Start a worker and keep it running by its restart policy until ``stop_worker``. A
        worker of that name that is down (waiting to restart, or ended) is replaced."""
        return await self.keeper.spawn(spec)

    async def stop_worker(self, group: str, instance: str) -> None:
        """Stop a worker and stop keeping it (``Keeper.stop``), then wait for a snapshot
        collected after that (``heartbeat.interval_s`` at most), so that ``GET /v1/workers``
        no longer lists it once this returns: a collection under way when it stopped still
        read its process."""
        await self.keeper.stop(group, instance)
        await self._collected_from_now()

    async def _collected_from_now(self) -> None:
        begun = self._begun
        self._wake_now()
        with trio.move_on_after(self.config.heartbeat.interval_s):
            while self._published <= begun:
                await self._changed.wait()

    async def _collect_loop(self) -> None:
        interval = self.config.heartbeat.interval_s
        while True:
            with trio.move_on_after(interval):
                await self._wake_event.wait()
            self._wake_event = trio.Event()
            await self._publish()

    async def _publish(self) -> None:
        self._begun += 1
        number = self._begun
        down_before = self.keeper.down_keys()  # before the tick's list: see Supervisor.records
        self._patched_since = {}
        records = await trio.to_thread.run_sync(self.collector.collect_all,
                                                limiter=self._collect_limiter)
        gone, self._gone[:] = list(self._gone), []
        for worker in gone:  # after the tick, before the snapshot: it lists them as down
            await trio.to_thread.run_sync(self.monitor.reap, worker)
        latest = self._heartbeat(self.keeper.records(records, down_before))
        patched, self._patched_since = self._patched_since, None
        self._published = number
        self._set_latest(_with_engines(latest, patched)[0] if patched else latest)

    def _set_latest(self, latest: HiveHeartbeat) -> None:
        self.latest = latest
        self.generation += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def patch_engines(self, changes: Mapping[tuple[str, str], EngineState | str]) -> bool:
        """Publish the latest snapshot with these workers' engine state replaced (a string: why
        the engine cannot be read now), without a collection: the fast engine poll's changes
        reach the sender within a poll round instead of the next tick. A collection running
        meanwhile gets them too (its snapshot would otherwise carry what it read before). False
        if none of them is in the snapshot (the worker went since)."""
        if self._patched_since is not None:
            self._patched_since.update(changes)
        latest, hit = _with_engines(self.latest, changes)
        if hit:
            self._set_latest(latest)
        return hit

    def _heartbeat(self, workers) -> HiveHeartbeat:
        return snapshot.heartbeat(self.config, self.port, self.status, self.health(),
                                  self.collector, workers)

    def farewell(self) -> HiveHeartbeat:
        """The last heartbeat of a hive that stopped its workers: status stopped, no workers."""
        self.status = OperationalStatus.STOPPED
        return self._heartbeat([])

    def health(self) -> HealthStatus:
        return snapshot.health(self.collector, self.loops.issues())

    async def _shutdown(self) -> None:
        if self.config.stop_workers_on_exit:
            await trio.to_thread.run_sync(self.monitor.stop_all, self.config.stop_grace_s)
            self.monitor.backend.remove_root()
        else:
            self.monitor.release()
        self.monitor.backend.unclaim()
        self.collector.close()
        self.status = OperationalStatus.STOPPED


def _with_engines(heartbeat: HiveHeartbeat, changes: Mapping[tuple[str, str], EngineState | str]
                  ) -> tuple[HiveHeartbeat, bool]:
    """``heartbeat`` with the engine of each worker in ``changes`` replaced, and whether any
    was there. An unreadable engine (a string) is ``engine: null`` and one ``errors`` entry."""
    workers, hit = [], False
    for worker in heartbeat.workers:
        change = changes.get((worker.group, worker.instance))
        if change is None:
            workers.append(worker)
            continue
        hit = True
        errors = [e for e in worker.errors if e.collector != ENGINE_COLLECTOR]
        if isinstance(change, str):
            errors.append(CollectorIssue(collector=ENGINE_COLLECTOR, message=change))
            change = None
        workers.append(msgspec.structs.replace(worker, engine=change, errors=errors))
    if not hit:
        return heartbeat, False
    return msgspec.structs.replace(heartbeat, workers=workers, timestamp=utc_now()), True
