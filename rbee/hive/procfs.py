"""What the hive reads about a process from /proc, and its pidfd: the kernel's word on whether a
process still runs, who its parent is, and what it was started with."""

from __future__ import annotations

import os

GONE_STATES = (-1, ord("Z"), ord("X"))
"""/proc states of a main process that has exited (unreadable, zombie, dead)."""


def read_cmdline(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return ()
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


def main_pid(pids: list[int]) -> int:
    """A worker's main process: the one whose parent is outside the worker's cgroup."""
    members = set(pids)
    for pid in sorted(pids):
        fields = _stat_fields(pid)
        if fields is not None and len(fields) > 1 and int(fields[1]) not in members:
            return pid
    return min(pids)


def open_pidfd(pid: int) -> int:
    """A pidfd that polls readable once the process exits; -1 where the kernel has none (< 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1
