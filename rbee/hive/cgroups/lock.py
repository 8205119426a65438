"""One hive per cgroup root: an exclusive ``flock`` on the root directory itself.

Two hives on one root would each adopt the other's workers (both re-adopt every cgroup under it)
and report them twice. The lock is taken on the cgroup directory, not on a file beside it, so it
holds whatever /run or mount namespace each hive sees, needs no writable runtime directory (an
unprivileged hive with a delegated subtree has one), and dies with its holder: a hive killed by
SIGKILL leaves nothing to clean up. The holder's PID is read back from ``/proc/locks``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..._errors import CgroupError
from ..procfs import read_cmdline


class RootLock:
    """Held from ``acquire`` until ``release`` (or the process's end)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock, or raise CgroupError naming the root, the holder and the way out."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(os.fstat(fd))
            os.close(fd)
            raise CgroupError(
                f"cgroup root {self.root} is held by another live hive ({describe(holder)}): "
                f"a second hive there would adopt its workers; give this hive its own `id` "
                f"(the root defaults to rbee.slice/<id>) or its own `cgroup.root`",
                path=str(self.root)) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1


def holder_pid(stat: os.stat_result, locks: str = "/proc/locks") -> int | None:
    """The PID holding a flock on the file of ``stat``, from /proc/locks
    (``1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF``, device numbers in hex)."""
    wanted = (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino)
    try:
        with open(locks) as lines:
            for line in lines:
                fields = line.split()
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                    continue  # "->" marks a waiter, not a holder
                major, minor, inode = fields[5].split(":")
                if (int(major, 16), int(minor, 16), int(inode)) == wanted:
                    return int(fields[4])
    except (OSError, ValueError):
        return None
    return None


def describe(pid: int | None) -> str:
    """"pid 1234: rbee-hive --config /etc/rbee/hive.yaml", as far as this user may read it."""
    if pid is None:
        return "pid unknown"
    command = " ".join(read_cmdline(pid))
    return f"pid {pid}: {command[:200]}" if command else f"pid {pid}"
