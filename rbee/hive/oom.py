"""OOM kills of one worker, from its cgroup's counter: ``oom_kill`` in ``memory.events`` (v2) or
``memory.oom_control`` (v1), both ``key value`` lines.

The file is opened once per worker and re-read with ``pread`` (as the stat files are), on every
collection tick for a worker with a memory limit (the ones their own limit can OOM-kill) and
always once more when its main process has exited, before its cgroup is removed: that last read
tells an OOM kill from any other SIGKILL. A cgroup's counter starts at 0 with the cgroup, so each
incarnation of a restarted worker counts its own kills and the hive adds them up.
"""

from __future__ import annotations

import os

READ_BYTES = 512
"""Both files are a few short lines (memory.events: 6, memory.oom_control: 3)."""


def parse_oom_kills(text: bytes) -> int:
    """The ``oom_kill`` count of a memory.events or memory.oom_control text; -1 when absent.
    (``oom_kill_disable`` and ``oom_group_kill`` are other keys.)"""
    for line in text.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"oom_kill":
            try:
                return int(value)
            except ValueError:
                return -1
    return -1


class OomCounter:
    """A worker's OOM-kill counter file, kept open; -1 readings where there is none."""

    __slots__ = ("fd", "last")

    def __init__(self, path: str | None) -> None:
        self.fd = -1
        self.last = 0
        """The highest count read so far (what the worker's record shows between reads)."""
        if path is not None:
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = -1

    def read(self) -> int:
        """The count now (also kept in ``last``); ``last`` when the file cannot be read."""
        if self.fd < 0:
            return self.last
        try:
            count = parse_oom_kills(os.pread(self.fd, READ_BYTES, 0))
        except OSError:
            return self.last
        if count > self.last:
            self.last = count
        return self.last

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
