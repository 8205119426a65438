"""How a worker's process ended, told once, when the hive reaps it and before its cgroup goes."""

from __future__ import annotations

import signal

from ..contract import WorkerExit, utc_now
from .oom import OomCounter
from .stderr_tail import OutputTail


def ending(pid: int, status: int | None, oom: OomCounter | None, output: OutputTail | None,
           ran_s: float, stopping: bool) -> WorkerExit:
    """The ``WorkerExit`` of a main process that ended with ``status`` (Popen's: negative for a
    signal; None when it was not the hive's child), closing its OOM counter and stderr handles.

    An OOM kill is a SIGKILL (or an unknown status) while its cgroup's ``oom_kill`` count is
    above 0, unless the hive was stopping it itself (its SIGKILL after the grace period)."""
    oom_kills = 0
    if oom is not None:
        oom_kills = oom.read()
        oom.close()
    tail: list[str] = []
    if output is not None:
        tail = output.lines()
        output.close()
    killed = status is None or status == -signal.SIGKILL
    return WorkerExit(
        at=utc_now(), pid=pid,
        exit_code=status if status is not None and status >= 0 else None,
        signal=signal_name(-status) if status is not None and status < 0 else None,
        oom_killed=killed and oom_kills > 0 and not stopping,
        ran_s=round(max(0.0, ran_s), 3), stderr_tail=tail)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
