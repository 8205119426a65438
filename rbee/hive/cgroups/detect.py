"""Picks the cgroup backend for this host, and where under the hierarchy workers go.

``auto``: pure v2 (mounted at /sys/fs/cgroup) → v2; v1 controllers mounted → v1 (a hybrid host's
v2 mount has no controllers to offer); a v2 mount only → v2 without limits; nothing usable, or no
permission to create the root → the ``none`` backend with a warning. Naming a backend explicitly
turns those fallbacks into errors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..._errors import CgroupError, ConfigError
from .base import CgroupBackend, make_dir, write_file
from .none import NoCgroup
from .v1 import CONTROLLERS, CgroupV1
from .v2 import CgroupV2

log = logging.getLogger(__name__)

DEFAULT_ROOT = "rbee.slice"
"""The parent of every hive's default root, ``rbee.slice/<hive id>``: one root per hive, so two
hives on one host never adopt each other's workers (and a root is held by one live hive: ``claim``)."""
BACKENDS = ("auto", "v2", "v1", "none")


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[Path | None, dict[str, Path]]:
    """(v2 mount point, {v1 controller: mount point}) from mountinfo."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    with open(mountinfo) as lines:
        for line in lines:
            fields, _, tail = line.partition(" - ")
            fstype, _source, *options = tail.split()
            mount_point = Path(fields.split()[4])
            if fstype == "cgroup2" and (v2 is None or mount_point == Path("/sys/fs/cgroup")):
                v2 = mount_point
            elif fstype == "cgroup":
                for option in options[0].split(",") if options else ():
                    if option in CONTROLLERS:
                        v1.setdefault(option, mount_point)
    return v2, v1


def own_v2_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> str:
    with open(proc_cgroup) as lines:
        for line in lines:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def delegated_root(mount: Path) -> str | None:
    """Under systemd with Delegate=yes (INVOCATION_ID set, own cgroup not "/"), the hive's own
    cgroup is its subtree: workers go to ``<own>/workers`` and the hive moves itself to
    ``<own>/hive``, since v2 forbids processes in a cgroup whose controllers are delegated down."""
    own = own_v2_cgroup()
    if not os.environ.get("INVOCATION_ID") or own == "/":
        return None
    base = mount / own.lstrip("/")
    if base.name == "hive":  # already moved on a previous start in this unit
        base = base.parent
    leaf = base / "hive"
    make_dir(leaf)
    write_file(leaf / "cgroup.procs", str(os.getpid()))
    return str((base / "workers").relative_to(mount))


def default_root(hive_id: str | None) -> str:
    return f"{DEFAULT_ROOT}/{hive_id}" if hive_id else DEFAULT_ROOT


def select_backend(
    backend: str = "auto", root: str = "auto", io_counters: str = "auto",
    mountinfo: str = "/proc/self/mountinfo", hive_id: str | None = None,
) -> CgroupBackend:
    """Build and prepare the backend; raises CgroupError when an explicit choice cannot work.
    ``root: auto`` is the delegated subtree under systemd (v2), else ``rbee.slice/<hive_id>``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown cgroup backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "none":
        return NoCgroup()
    try:
        v2_mount, v1_mounts = read_mounts(mountinfo)
    except OSError:
        v2_mount, v1_mounts = None, {}
    pure_v2 = v2_mount == Path("/sys/fs/cgroup")
    use_v1 = backend == "v1" or (backend == "auto" and not pure_v2 and "cpuacct" in v1_mounts)
    chosen: CgroupBackend
    if use_v1:
        if not v1_mounts:
            raise CgroupError("cgroup v1 was asked for but no v1 controller is mounted")
        relative = default_root(hive_id) if root == "auto" else root.strip("/")
        chosen = CgroupV1(v1_mounts, relative, io_counters)
    elif v2_mount is not None:
        relative = (root.strip("/") if root != "auto"
                    else delegated_root(v2_mount) or default_root(hive_id))
        chosen = CgroupV2(v2_mount, v2_mount / relative)
    elif backend == "auto":
        log.warning("no cgroup hierarchy is mounted: workers run without cgroups or limits")
        return NoCgroup()
    else:
        raise CgroupError("cgroup v2 was asked for but no cgroup2 filesystem is mounted")
    try:
        chosen.prepare()
    except CgroupError as exc:
        if backend != "auto":
            raise
        log.warning("%s; falling back to running workers without cgroups", exc)
        return NoCgroup()
    return chosen
