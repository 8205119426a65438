"""The interface every cgroup backend implements, and the directory work v1 and v2 share.

A worker lives in ``<root>/<group>/<instance>``. v2 has one tree; v1 has one tree per controller
(cpu, cpuacct, memory, blkio, pids), which is why the shared code works on a list of hierarchy
roots and the subclasses only say which files hold limits and counters.
"""

from __future__ import annotations

import errno
import os
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..._errors import CgroupError
from ..._sample import CPU_NONE, IO_NONE
from ...limits import Limits
from .lock import RootLock


@dataclass(frozen=True, slots=True)
class StatPaths:
    """Which files a worker's counters are read from, and in which format (``rbee._sample``)."""

    cpu: str | None = None
    cpu_format: int = CPU_NONE
    memory_current: str | None = None
    memory_stat: str | None = None
    memory_stat_format: int = 0
    io: str | None = None
    io_format: int = IO_NONE
    oom_events: str | None = None
    """The file whose ``oom_kill`` line counts the cgroup's OOM kills (``rbee.hive.oom``)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a spawned worker goes: files the child writes its own PID into before exec."""

    procs_files: tuple[str, ...]
    limits_applied: bool


class CgroupBackend(ABC):
    """Creates, fills, reads and removes worker cgroups."""

    name: str

    @abstractmethod
    def prepare(self) -> None:
        """Check the root can be used (create it, enable controllers); raise CgroupError if not."""

    @abstractmethod
    def create(self, group: str, instance: str, limits: Limits) -> Placement:
        """Create the worker's cgroup with its limits. Leaves nothing behind when it raises."""

    @abstractmethod
    def remove(self, group: str, instance: str) -> None:
        """Remove an empty worker cgroup, and its group when that is now empty."""

    @abstractmethod
    def pids(self, group: str, instance: str) -> list[int]:
        """Every process in the worker's cgroup (its children too)."""

    @abstractmethod
    def enumerate(self) -> list[tuple[str, str]]:
        """(group, instance) of every worker cgroup under the root."""

    @abstractmethod
    def stat_paths(self, group: str, instance: str, pid: int) -> StatPaths: ...

    @abstractmethod
    def read_limits(self, group: str, instance: str) -> Limits: ...

    def cgroup_path(self, group: str, instance: str) -> str | None:
        """The worker's cgroup directory (the first hierarchy's on v1); None without cgroups."""
        return None

    def cgroup_paths(self, group: str, instance: str) -> dict[str, str]:
        """The worker's cgroup directory for each controller it has (one directory for all on
        v2, one per hierarchy on v1); empty without cgroups."""
        return {}

    def remove_root(self) -> None:
        """Remove the root when no worker cgroup is left under it (clean shutdown)."""
        return None

    def claim(self) -> None:
        """Take this root for this hive alone, or raise CgroupError naming the hive that holds it
        (``lock.RootLock``). Without a root (the none backend) there is nothing to share."""
        return None

    def unclaim(self) -> None:
        return None

    def adopt(self, group: str, instance: str, pid: int) -> None:
        """Record that ``pid`` is the worker's main process. A cgroup records its members itself
        (the child joined it before exec); only the none backend has to remember."""
        return None

    def kill(self, group: str, instance: str, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of the worker."""
        for pid in self.pids(group, instance):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def members(self, group: str, instance: str) -> list[int]:
        """The worker's processes that still run: while any does, it is not gone."""
        return self.pids(group, instance)


PERMISSION_HINT = ("run the hive as root, give it a delegated cgroup subtree (systemd Delegate=yes), "
                   "or set cgroup.backend: none")


def write_file(path: Path, value: str) -> None:
    """Write a cgroup control file, translating the kernel's refusal into a CgroupError."""
    try:
        path.write_text(value)
    except PermissionError as exc:
        raise CgroupError(f"permission denied writing {path}: {PERMISSION_HINT}",
                          path=str(path)) from exc
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}", path=str(path)) from exc


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class CgroupTree(CgroupBackend):
    """Directory handling shared by v1 and v2 over one or more hierarchy roots."""

    def __init__(self, roots: list[Path]) -> None:
        unique: list[Path] = []
        for root in roots:
            if root not in unique:
                unique.append(root)
        self.roots = unique
        self._claim = RootLock(unique[0])
        self._made: list[Path] = []

    def claim(self) -> None:
        self._claim.acquire()

    def unclaim(self) -> None:
        self._claim.release()

    @property
    def primary(self) -> Path:
        return self.roots[0]

    def prepare(self) -> None:
        for root in self.roots:
            missing = [path for path in (root, *root.parents) if not path.exists()]
            make_dir(root, parents=True)
            self._made += missing  # deepest first: rbee.slice/<id>, then rbee.slice

    def remove_root(self) -> None:
        """Remove the root, and the parents ``prepare`` made, each only if empty (another hive's
        root under ``rbee.slice`` keeps it)."""
        for root in self.roots:
            remove_dir(root, only_if_empty=True)
        for path in self._made:
            remove_dir(path, only_if_empty=True)

    def cgroup_path(self, group: str, instance: str) -> str | None:
        return str(self.primary / group / instance)

    def worker_dirs(self, group: str, instance: str) -> list[Path]:
        return [root / group / instance for root in self.roots]

    def create(self, group: str, instance: str, limits: Limits) -> Placement:
        made: list[Path] = []
        try:
            for root in self.roots:
                for path in (root / group, root / group / instance):
                    if make_dir(path):
                        made.append(path)
            applied = self.apply_limits(group, instance, limits)
        except BaseException:
            for path in reversed(made):
                remove_dir(path)
            raise
        procs = tuple(str(path / "cgroup.procs") for path in self.worker_dirs(group, instance))
        return Placement(procs_files=procs, limits_applied=applied)

    @abstractmethod
    def apply_limits(self, group: str, instance: str, limits: Limits) -> bool:
        """Write limits; True when every requested limit is enforced."""

    def remove(self, group: str, instance: str) -> None:
        for root in self.roots:
            remove_dir(root / group / instance)
            remove_dir(root / group, only_if_empty=True)

    def pids(self, group: str, instance: str) -> list[int]:
        text = read_text(self.primary / group / instance / "cgroup.procs")
        return [int(line) for line in text.split()] if text else []

    def enumerate(self) -> list[tuple[str, str]]:
        found = []
        try:
            groups = sorted(
                (entry for entry in os.scandir(self.primary) if entry.is_dir()),
                key=lambda entry: entry.name,
            )
        except OSError:
            return []
        for group in groups:
            for instance in sorted(os.scandir(group.path), key=lambda entry: entry.name):
                if instance.is_dir():
                    found.append((group.name, instance.name))
        return found


def make_dir(path: Path, parents: bool = False) -> bool:
    """mkdir that says whether it created the directory; permission errors become CgroupError."""
    try:
        path.mkdir(parents=parents)
        return True
    except FileExistsError:
        return False
    except PermissionError as exc:
        raise CgroupError(f"permission denied creating cgroup {path}: {PERMISSION_HINT}",
                          path=str(path)) from exc
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", path=str(path)) from exc


def remove_dir(path: Path, only_if_empty: bool = False) -> None:
    """rmdir a cgroup. A cgroup with child cgroups or processes stays (EBUSY / ENOTEMPTY)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not (only_if_empty and exc.errno in (errno.EBUSY, errno.ENOTEMPTY)):
            raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}", path=str(path)) from exc
