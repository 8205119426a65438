"""Restart supervision: which workers the hive keeps, when a failed one starts again, and what a
worker that is not running looks like in the heartbeat.

A worker the hive keeps (its config's, or one spawned through the API) has a ``Lifecycle`` from
its first spawn until it is stopped on purpose (``DELETE``, ``forget``). When its process ends,
the lifecycle records how (``WorkerExit``: exit code or signal, OOM kill, the last lines of
stderr), adds the incarnation's OOM kills to its count, and the restart policy decides:

- ``restart_wanted``: ``always``; ``on-failure`` unless it exited 0; never for ``never``.
- backoff: ``restart_backoff_s`` doubling with each *quick* failure in a row (one that ran less
  than ``restart_backoff_max_s``), up to ``restart_backoff_max_s``; a worker that ran that long
  starts the count again. State ``backoff``, with ``next_attempt_at``.
- crashloop: from the ``crashloop_after``-th quick failure in a row the worker is in
  ``crashloop`` and waits the longest backoff (``restart_backoff_max_s``) between attempts, so a
  worker that cannot start costs the host one attempt per that period, and says so.
- no restart: state ``exited`` (or ``oom_killed``); it stays listed, with its last exit, until
  deleted.

So a failed worker never vanishes from a listing: ``records`` gives the heartbeat one record for
every kept worker, live or not, with ``restarts``, ``oom_kills`` and ``last_exit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..config import WorkerSpec
from ..contract import WorkerExit, WorkerState, WorkerTelemetry, utc_now

Key = tuple[str, str]


def restart_wanted(spec: WorkerSpec, exit_code: int | None) -> bool:
    """Whether a worker that exited on its own is restarted. An unknown exit code (a re-adopted
    worker is not our child) counts as a failure."""
    if spec.restart == "always":
        return True
    return spec.restart == "on-failure" and exit_code != 0


@dataclass
class Lifecycle:
    """What the hive remembers of one kept worker across its processes."""

    group: str
    instance: str
    spec: WorkerSpec | None
    """None for a worker the hive re-adopted and has no spec of: it is never restarted."""
    restarts: int = 0
    failures: int = 0
    """Quick failures in a row (each ran less than ``restart_backoff_max_s``)."""
    oom_kills_before: int = 0
    """OOM kills of its earlier, ended processes (each cgroup counts from 0)."""
    last_exit: WorkerExit | None = None
    state: WorkerState = WorkerState.RUNNING
    """Its state while no process runs (``backoff``, ``crashloop``, ``exited``, ``oom_killed``);
    ``running`` while one does (the record then says ``starting`` or ``running``)."""
    next_attempt_at: datetime | None = None
    last_record: WorkerTelemetry | None = None
    """Its last live record: model, limits and PID shown while it is down."""
    attempts: int = field(default=0, repr=False)
    """Incremented by every scheduled restart: a restart scheduled before a newer one is void."""


class Supervisor:
    def __init__(self) -> None:
        self.lives: dict[Key, Lifecycle] = {}

    def keep(self, spec: WorkerSpec) -> Lifecycle:
        """Keep a worker by its spec (a new spawn through the API replaces an old lifecycle)."""
        key = (spec.group, spec.instance)
        life = self.lives.get(key)
        if life is None or life.spec is not spec:
            life = self.lives[key] = Lifecycle(spec.group, spec.instance, spec)
        return life

    def spec(self, key: Key) -> WorkerSpec | None:
        life = self.lives.get(key)
        return life.spec if life is not None else None

    def forget(self, key: Key) -> bool:
        """Stop keeping a worker (a stop on purpose); True if it was kept."""
        return self.lives.pop(key, None) is not None

    def down(self, key: Key) -> bool:
        """Whether the worker is kept but has no process now (waiting to restart, or ended)."""
        life = self.lives.get(key)
        return life is not None and life.state is not WorkerState.RUNNING

    def started(self, key: Key) -> None:
        life = self.lives.get(key)
        if life is not None:
            if life.state is not WorkerState.RUNNING:
                life.restarts += 1
            life.state, life.next_attempt_at = WorkerState.RUNNING, None

    def ended(self, key: Key, ending: WorkerExit, oom_kills: int) -> float | None:
        """A kept worker's process ended on its own: record it and return the delay before its
        restart, or None when it is not restarted."""
        life = self.lives.get(key)
        if life is None:
            life = self.lives[key] = Lifecycle(key[0], key[1], None)
        life.last_exit = ending
        life.oom_kills_before += oom_kills
        spec = life.spec
        if spec is None or not restart_wanted(spec, ending.exit_code):
            life.state = WorkerState.OOM_KILLED if ending.oom_killed else WorkerState.EXITED
            return None
        life.failures = 0 if ending.ran_s >= spec.restart_backoff_max_s else life.failures + 1
        if life.failures >= spec.crashloop_after:
            delay, life.state = spec.restart_backoff_max_s, WorkerState.CRASHLOOP
        else:
            delay = min(spec.restart_backoff_s * 2 ** max(life.failures - 1, 0),
                        spec.restart_backoff_max_s)
            life.state = WorkerState.BACKOFF
        life.next_attempt_at = utc_now() + timedelta(seconds=delay)
        life.attempts += 1
        return delay

    def down_keys(self) -> frozenset[Key]:
        """The kept workers that have no process now (read before a tick takes its list)."""
        return frozenset(key for key, life in self.lives.items()
                         if life.state is not WorkerState.RUNNING)

    def records(self, live: list[WorkerTelemetry], down_before: frozenset[Key] = frozenset()
                ) -> list[WorkerTelemetry]:
        """The heartbeat's workers: the live records, each with its lifecycle's figures and
        ``starting`` until its rates are measured, then one record for each kept worker that has
        no process now, so none vanishes while it waits or after it ended. A worker that was
        down when the tick took its list (``down_before``) and was restarted since is listed as
        ``starting``: the tick could not see its new process. A live record of the process
        that last ended (the tick read it before it did) is listed from the lifecycle instead,
        as down or, if restarted since, ``starting``: never as running."""
        seen, ended, current = set(), set(), []
        for record in live:
            key = (record.group, record.instance)
            life = self.lives.get(key)
            if life is not None and life.last_exit is not None and \
                    life.last_exit.pid == record.pid:
                ended.add(key)
                continue
            seen.add(key)
            current.append(record)
            if record.rate_window_s == 0.0:
                record.state = WorkerState.STARTING
            if life is None:
                continue
            life.last_record = record
            record.restarts = life.restarts
            record.oom_kills += life.oom_kills_before
            record.last_exit = life.last_exit
        return current + [self._down_record(life, restarted=life.state is WorkerState.RUNNING)
                          for key, life in self.lives.items() if key not in seen
                          and (life.state is not WorkerState.RUNNING or key in down_before
                               or key in ended)]

    @staticmethod
    def _down_record(life: Lifecycle, restarted: bool = False) -> WorkerTelemetry:
        last = life.last_record
        return WorkerTelemetry(
            pid=life.last_exit.pid if life.last_exit and not restarted else 0, group=life.group,
            instance=life.instance, cpu_pct=0.0, rss_mb=0, io_r_mb_s=0.0, io_w_mb_s=0.0,
            uptime_s=0, gpu_util_pct=None, vram_mb=0, total_vram_mb=0,
            model=last.model if last else None,
            state=WorkerState.STARTING if restarted else life.state,
            cpu_limit_pct=last.cpu_limit_pct if last else None,
            memory_limit_mb=last.memory_limit_mb if last else None,
            limits_applied=last.limits_applied if last else True,
            endpoint=last.endpoint if last else None,
            restarts=life.restarts, oom_kills=life.oom_kills_before, last_exit=life.last_exit,
            next_attempt_at=life.next_attempt_at)
