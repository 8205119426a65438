"""Pure-Python twin of ``ext/_cstat.pyx``: the reference for the parsing rules.

Used when the extension is not built or ``RBEE_PUREPYTHON=1``. A differential property test holds
the two to identical results on well-formed and malformed input, so any rule changed here must be
changed there too.

Rules, shared by both:
- a number is a non-empty run of ASCII digits making up the whole token, at most INT64_MAX;
- a single-value file holds a number on its first line;
- a flat-keyed file has lines "key value"; the first line whose key matches wins;
- summed counters ignore malformed tokens; a sum above INT64_MAX is -1.
"""

from __future__ import annotations

import os

from ._sample import (
    CPU_V1_USAGE_NS,
    CPU_V2_STAT,
    INT64_MAX,
    IO_PROC,
    IO_V1_BLKIO,
    IO_V2_STAT,
    MEMSTAT_V1,
    MEMSTAT_V2,
    READ_LIMIT,
    StatSample,
)

IMPLEMENTATION = "python"


def parse_number(token: bytes) -> int:
    if not token.isdigit():
        return -1
    digits = token.lstrip(b"0")
    if len(digits) > 19:
        return -1
    value = int(digits or b"0")
    return value if value <= INT64_MAX else -1


def _capped(total: int) -> int:
    return total if total <= INT64_MAX else -1


def parse_single(data: bytes) -> int:
    return parse_number(data.split(b"\n", 1)[0])


def parse_keyed(data: bytes, key: bytes) -> int:
    for line in data.split(b"\n"):
        space = line.find(b" ")
        if space >= 0 and line[:space] == key:
            return parse_number(line[space + 1 :])
    return -1


def parse_io_v2(data: bytes) -> tuple[int, int]:
    read = write = 0
    for line in data.split(b"\n"):
        for token in line.split(b" ")[1:]:
            if token.startswith(b"rbytes="):
                value = parse_number(token[7:])
                if value >= 0:
                    read += value
            elif token.startswith(b"wbytes="):
                value = parse_number(token[7:])
                if value >= 0:
                    write += value
    return _capped(read), _capped(write)


def parse_blkio_v1(data: bytes) -> tuple[int, int]:
    read = write = 0
    for line in data.split(b"\n"):
        parts = line.split(b" ")
        if len(parts) != 3:
            continue
        if parts[1] == b"Read":
            value = parse_number(parts[2])
            if value >= 0:
                read += value
        elif parts[1] == b"Write":
            value = parse_number(parts[2])
            if value >= 0:
                write += value
    return _capped(read), _capped(write)


def parse_proc_io(data: bytes) -> tuple[int, int]:
    return parse_keyed(data, b"read_bytes:"), parse_keyed(data, b"write_bytes:")


def parse_proc_stat(data: bytes) -> tuple[int, int, int, int]:
    """(state byte, utime + stime ticks, start ticks, resident pages) from /proc/<pid>/stat.

    The command name in parentheses may hold spaces and ")" itself, so fields are counted from the
    last ")".
    """
    close = data.rfind(b")")
    if close < 0 or data[close + 1 : close + 2] != b" ":
        return -1, -1, -1, -1
    fields = data[close + 2 :].split(b" ")
    state = fields[0][0] if len(fields[0]) == 1 else -1
    utime = parse_number(fields[11]) if len(fields) > 11 else -1
    stime = parse_number(fields[12]) if len(fields) > 12 else -1
    start = parse_number(fields[19]) if len(fields) > 19 else -1
    resident = parse_number(fields[21]) if len(fields) > 21 else -1
    ticks = _capped(utime + stime) if utime >= 0 and stime >= 0 else -1
    return state, ticks, start, resident


def _read(fd: int) -> bytes | None:
    if fd < 0:
        return None
    try:
        return os.pread(fd, READ_LIMIT, 0)
    except OSError:
        return None


def read_sample(
    cpu_fd: int,
    cpu_format: int,
    memory_current_fd: int,
    memory_stat_fd: int,
    memory_stat_format: int,
    io_fd: int,
    io_format: int,
    proc_stat_fd: int,
) -> StatSample:
    """Re-read a worker's already open stat files at offset 0 and parse them into one sample."""
    cpu_usec = -1
    data = _read(cpu_fd)
    if data is not None:
        if cpu_format == CPU_V2_STAT:
            cpu_usec = parse_keyed(data, b"usage_usec")
        elif cpu_format == CPU_V1_USAGE_NS:
            nanoseconds = parse_single(data)
            cpu_usec = nanoseconds // 1000 if nanoseconds >= 0 else -1

    data = _read(memory_current_fd)
    memory_current = parse_single(data) if data is not None else -1

    memory_rss = -1
    data = _read(memory_stat_fd)
    if data is not None:
        if memory_stat_format == MEMSTAT_V2:
            memory_rss = parse_keyed(data, b"anon")
        elif memory_stat_format == MEMSTAT_V1:
            memory_rss = parse_keyed(data, b"total_rss")

    io_read = io_write = -1
    data = _read(io_fd)
    if data is not None:
        if io_format == IO_V2_STAT:
            io_read, io_write = parse_io_v2(data)
        elif io_format == IO_V1_BLKIO:
            io_read, io_write = parse_blkio_v1(data)
        elif io_format == IO_PROC:
            io_read, io_write = parse_proc_io(data)

    data = _read(proc_stat_fd)
    state, ticks, start, resident = parse_proc_stat(data) if data is not None else (-1, -1, -1, -1)
    return StatSample(
        cpu_usec, memory_current, memory_rss, io_read, io_write, state, ticks, start, resident
    )
