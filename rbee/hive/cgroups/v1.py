"""cgroup v1: one tree per controller; a worker has a directory in each of them."""

from __future__ import annotations

from pathlib import Path

from ..._sample import CPU_V1_USAGE_NS, IO_PROC, IO_V1_BLKIO, MEMSTAT_V1
from ...limits import CPU_PERIOD_US, Limits
from .base import CgroupTree, StatPaths, read_text, write_file

CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")
UNLIMITED_MEMORY_FLOOR = 2**62
"""v1 reports "no limit" as a huge page-aligned number, not "max"."""


class CgroupV1(CgroupTree):
    name = "v1"

    def __init__(self, mounts: dict[str, Path], relative_root: str, io_counters: str = "auto"
                 ) -> None:
        self.io_counters = io_counters
        self.dirs = {controller: mounts[controller] / relative_root for controller in mounts}
        # cpuacct first: its cgroup.procs is read for membership; order beyond that is mkdir order.
        ordered = [self.dirs[c] for c in ("cpuacct", *CONTROLLERS) if c in self.dirs]
        super().__init__(ordered)

    def _dir(self, controller: str, group: str, instance: str) -> Path | None:
        root = self.dirs.get(controller)
        return root / group / instance if root else None

    def cgroup_paths(self, group: str, instance: str) -> dict[str, str]:
        return {controller: str(root / group / instance) for controller, root in self.dirs.items()}

    def apply_limits(self, group: str, instance: str, limits: Limits) -> bool:
        applied = True
        if limits.cpu_quota_us is not None:
            cpu = self._dir("cpu", group, instance)
            if cpu:
                write_file(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                write_file(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
            else:
                applied = False
        if limits.memory_bytes is not None:
            memory = self._dir("memory", group, instance)
            if memory:
                write_file(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            else:
                applied = False
        return applied

    def stat_paths(self, group: str, instance: str, pid: int) -> StatPaths:
        cpuacct = self._dir("cpuacct", group, instance)
        memory = self._dir("memory", group, instance)
        blkio = self._dir("blkio", group, instance)
        if self.io_counters != "cgroup":
            # v1 blkio counts only I/O that reaches the throttling layer, and on many current
            # kernels (this one: 6.x, blk-mq) it stays at "Total 0": the main process's own
            # counters are the honest figure there.
            blkio = None
        return StatPaths(
            cpu=str(cpuacct / "cpuacct.usage") if cpuacct else None,
            cpu_format=CPU_V1_USAGE_NS,
            memory_current=str(memory / "memory.usage_in_bytes") if memory else None,
            memory_stat=str(memory / "memory.stat") if memory else None,
            memory_stat_format=MEMSTAT_V1,
            io=str(blkio / "blkio.throttle.io_service_bytes") if blkio else f"/proc/{pid}/io",
            io_format=IO_V1_BLKIO if blkio else IO_PROC,
            oom_events=str(memory / "memory.oom_control") if memory else None,
        )

    def read_limits(self, group: str, instance: str) -> Limits:
        cpu_pct = memory = None
        cpu = self._dir("cpu", group, instance)
        if cpu:
            quota = (read_text(cpu / "cpu.cfs_quota_us") or "-1").strip()
            period = (read_text(cpu / "cpu.cfs_period_us") or "0").strip()
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                cpu_pct = int(quota) * 100 / int(period)
        mem = self._dir("memory", group, instance)
        if mem:
            limit = (read_text(mem / "memory.limit_in_bytes") or "").strip()
            if limit.isdigit() and int(limit) < UNLIMITED_MEMORY_FLOOR:
                memory = int(limit)
        return Limits(cpu_pct=cpu_pct, memory_bytes=memory)

