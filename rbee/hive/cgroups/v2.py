"""cgroup v2: one unified tree; controllers must be enabled top-down in cgroup.subtree_control."""

from __future__ import annotations

from pathlib import Path

from ..._errors import CgroupError
from ..._sample import CPU_V2_STAT, IO_PROC, IO_V2_STAT, MEMSTAT_V2
from ...limits import CPU_PERIOD_US, Limits
from .base import CgroupTree, StatPaths, read_text, write_file

WANTED_CONTROLLERS = ("cpu", "memory", "io", "pids")


class CgroupV2(CgroupTree):
    name = "v2"

    def __init__(self, mount: Path, root: Path) -> None:
        super().__init__([root])
        self.mount = mount
        self.enabled: set[str] = set()

    def prepare(self) -> None:
        """Create the root and enable what controllers the parent offers on each level down.

        Controllers that the parent does not offer cannot be had here (e.g. a v2 mount beside v1
        controllers); workers then run with their limits reported as not applied.
        """
        super().prepare()
        ancestor = self.mount
        for part in self.primary.relative_to(self.mount).parts[:-1]:  # rbee.slice of rbee.slice/<id>
            ancestor = ancestor / part
            try:
                self._enable_controllers(ancestor)
            except CgroupError:
                pass  # not ours to change (a delegated unit's parents): the root gets what it gets
        self.enabled = self._enable_controllers(self.primary)

    def _enable_controllers(self, path: Path) -> set[str]:
        available = set((read_text(path / "cgroup.controllers") or "").split())
        wanted = [name for name in WANTED_CONTROLLERS if name in available]
        current = set((read_text(path / "cgroup.subtree_control") or "").split())
        missing = [name for name in wanted if name not in current]
        if missing:
            write_file(path / "cgroup.subtree_control", " ".join(f"+{n}" for n in missing))
        return set(wanted)

    def cgroup_paths(self, group: str, instance: str) -> dict[str, str]:
        path = str(self.primary / group / instance)
        return {controller: path for controller in sorted(self.enabled)}

    def apply_limits(self, group: str, instance: str, limits: Limits) -> bool:
        group_dir = self.primary / group
        self._enable_controllers(group_dir)
        worker = group_dir / instance
        applied = True
        if limits.cpu_quota_us is not None:
            if "cpu" in self.enabled:
                write_file(worker / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
            else:
                applied = False
        if limits.memory_bytes is not None:
            if "memory" in self.enabled:
                write_file(worker / "memory.max", str(limits.memory_bytes))
            else:
                applied = False
        return applied

    def kill(self, group, instance, sig) -> None:
        kill_file = self.primary / group / instance / "cgroup.kill"
        if sig.name == "SIGKILL" and kill_file.exists():
            try:
                write_file(kill_file, "1")
                return
            except CgroupError:
                pass
        super().kill(group, instance, sig)

    def stat_paths(self, group: str, instance: str, pid: int) -> StatPaths:
        worker = self.primary / group / instance
        io_stat = worker / "io.stat"
        has_memory = (worker / "memory.current").exists()
        return StatPaths(
            cpu=str(worker / "cpu.stat"),
            cpu_format=CPU_V2_STAT,
            memory_current=str(worker / "memory.current") if has_memory else None,
            memory_stat=str(worker / "memory.stat") if has_memory else None,
            memory_stat_format=MEMSTAT_V2,
            io=str(io_stat) if io_stat.exists() else f"/proc/{pid}/io",
            io_format=IO_V2_STAT if io_stat.exists() else IO_PROC,
            oom_events=str(worker / "memory.events") if has_memory else None,
        )

    def read_limits(self, group: str, instance: str) -> Limits:
        worker = self.primary / group / instance
        cpu_pct = memory = None
        quota, _, period = (read_text(worker / "cpu.max") or "max").partition(" ")
        if quota.strip().isdigit() and period.strip().isdigit():
            cpu_pct = int(quota) * 100 / int(period)
        memory_max = (read_text(worker / "memory.max") or "max").strip()
        if memory_max.isdigit():
            memory = int(memory_max)
        return Limits(cpu_pct=cpu_pct, memory_bytes=memory)
