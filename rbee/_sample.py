"""What one read of a worker's stat files yields, shared by the Cython parser and its Python twin.

Every number is an integer as the kernel wrote it; -1 means "file absent, unreadable or malformed".
Keeping this raw (no rates, no units) lets both implementations be compared value for value.
"""

from __future__ import annotations

from typing import NamedTuple

# How the CPU file of a worker is laid out.
CPU_NONE = 0  # no cgroup: CPU time comes from /proc/<pid>/stat ticks
CPU_V2_STAT = 1  # cgroup v2 cpu.stat, "usage_usec N"
CPU_V1_USAGE_NS = 2  # cgroup v1 cpuacct.usage, one number in nanoseconds

# How memory.stat names resident anonymous memory.
MEMSTAT_V2 = 1  # "anon N"
MEMSTAT_V1 = 2  # "total_rss N" (hierarchical, includes child cgroups)

# How the I/O byte counters are laid out.
IO_NONE = 0
IO_V2_STAT = 1  # io.stat, "MAJ:MIN rbytes=N wbytes=N ..." per device
IO_V1_BLKIO = 2  # blkio.throttle.io_service_bytes, "MAJ:MIN Read N" per device and op
IO_PROC = 3  # /proc/<pid>/io, "read_bytes: N" / "write_bytes: N"

READ_LIMIT = 32768
"""Bytes read from each file per sample; longer files are parsed as far as this (both twins)."""

INT64_MAX = 2**63 - 1


class StatSample(NamedTuple):
    cpu_usage_usec: int
    memory_current_bytes: int
    memory_rss_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    proc_state: int
    """The state letter of /proc/<pid>/stat as its byte value (ord("S")), -1 if the process is gone."""
    proc_cpu_ticks: int
    """utime + stime of the main process, in clock ticks."""
    proc_start_ticks: int
    """Start time of the main process, in clock ticks after boot."""
    proc_rss_pages: int
    """Resident pages of the main process alone (used when no cgroup counts memory)."""
