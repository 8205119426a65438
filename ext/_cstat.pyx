# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cython parser of cgroup and /proc stat files: the per-tick hot path of the hive.

Re-reads each worker's already open files with ``pread`` at offset 0 into a stack buffer and parses
them in C, with no Python file objects, no bytes objects and no dicts on the way: those cost more
than the parsing itself. The rules are those of ``rbee/_pystat.py`` (the reference twin); a
differential property test keeps the two identical.
"""

from libc.stdint cimport int64_t
from libc.errno cimport errno, EINTR
from posix.unistd cimport pread

from rbee._sample import StatSample

IMPLEMENTATION = "cython"

cdef enum:
    READ_LIMIT = 32768
    CPU_V2_STAT = 1
    CPU_V1_USAGE_NS = 2
    MEMSTAT_V2 = 1
    MEMSTAT_V1 = 2
    IO_V2_STAT = 1
    IO_V1_BLKIO = 2
    IO_PROC = 3

cdef int64_t INT64_MAX = 9223372036854775807


cdef inline int64_t _number(const char* s, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """The whole of s[start:end] as a decimal number, or -1."""
    cdef int64_t value = 0
    cdef int digit
    if start >= end:
        return -1
    while start < end:
        digit = s[start] - 48
        if digit < 0 or digit > 9:
            return -1
        if value > (INT64_MAX - digit) // 10:
            return -1
        value = value * 10 + digit
        start += 1
    return value


cdef inline Py_ssize_t _find(const char* s, Py_ssize_t start, Py_ssize_t end, char c) noexcept nogil:
    while start < end:
        if s[start] == c:
            return start
        start += 1
    return -1


cdef inline bint _equals(const char* s, Py_ssize_t start, Py_ssize_t end, const char* word, Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t i
    if end - start != length:
        return False
    for i in range(length):
        if s[start + i] != word[i]:
            return False
    return True


cdef inline bint _starts(const char* s, Py_ssize_t start, Py_ssize_t end, const char* word, Py_ssize_t length) noexcept nogil:
    return end - start >= length and _equals(s, start, start + length, word, length)


cdef inline int64_t _add(int64_t total, int64_t value) noexcept nogil:
    """Saturating sum: -2 marks an overflow that stays an overflow (reported as -1)."""
    if total == -2:
        return -2
    if total > INT64_MAX - value:
        return -2
    return total + value


cdef inline int64_t _final(int64_t total) noexcept nogil:
    return -1 if total == -2 else total


cdef inline Py_ssize_t _line_end(const char* s, Py_ssize_t start, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t end = _find(s, start, n, 10)
    return n if end < 0 else end


cdef int64_t _single(const char* s, Py_ssize_t n) noexcept nogil:
    return _number(s, 0, _line_end(s, 0, n))


cdef int64_t _keyed(const char* s, Py_ssize_t n, const char* key, Py_ssize_t key_length) noexcept nogil:
    cdef Py_ssize_t start = 0, end, space
    while start <= n:
        end = _line_end(s, start, n)
        space = _find(s, start, end, 32)
        if space >= 0 and _equals(s, start, space, key, key_length):
            return _number(s, space + 1, end)
        start = end + 1
    return -1


cdef void _io_v2(const char* s, Py_ssize_t n, int64_t* read, int64_t* write) noexcept nogil:
    cdef Py_ssize_t start = 0, end, token, token_end
    cdef int64_t r = 0, w = 0, value
    while start <= n:
        end = _line_end(s, start, n)
        token = _find(s, start, end, 32)
        while token >= 0:
            token += 1
            token_end = _find(s, token, end, 32)
            if token_end < 0:
                token_end = end
            if _starts(s, token, token_end, b"rbytes=", 7):
                value = _number(s, token + 7, token_end)
                if value >= 0:
                    r = _add(r, value)
            elif _starts(s, token, token_end, b"wbytes=", 7):
                value = _number(s, token + 7, token_end)
                if value >= 0:
                    w = _add(w, value)
            token = token_end if token_end < end else -1
        start = end + 1
    read[0] = _final(r)
    write[0] = _final(w)


cdef void _blkio_v1(const char* s, Py_ssize_t n, int64_t* read, int64_t* write) noexcept nogil:
    cdef Py_ssize_t start = 0, end, first, second
    cdef int64_t r = 0, w = 0, value
    while start <= n:
        end = _line_end(s, start, n)
        first = _find(s, start, end, 32)
        second = _find(s, first + 1, end, 32) if first >= 0 else -1
        if second >= 0 and _find(s, second + 1, end, 32) < 0:
            if _equals(s, first + 1, second, b"Read", 4):
                value = _number(s, second + 1, end)
                if value >= 0:
                    r = _add(r, value)
            elif _equals(s, first + 1, second, b"Write", 5):
                value = _number(s, second + 1, end)
                if value >= 0:
                    w = _add(w, value)
        start = end + 1
    read[0] = _final(r)
    write[0] = _final(w)


cdef void _proc_stat(const char* s, Py_ssize_t n, int64_t* state, int64_t* ticks, int64_t* start_ticks,
                     int64_t* resident) noexcept nogil:
    cdef Py_ssize_t close = n - 1, token, token_end
    cdef int index = 0
    cdef int64_t utime = -1, stime = -1
    state[0] = -1
    ticks[0] = -1
    start_ticks[0] = -1
    resident[0] = -1
    while close >= 0 and s[close] != 41:  # ")"
        close -= 1
    if close < 0 or close + 1 >= n or s[close + 1] != 32:
        return
    token = close + 2
    while True:
        token_end = _find(s, token, n, 32)
        if token_end < 0:
            token_end = n
        if index == 0:
            if token_end - token == 1:
                state[0] = <unsigned char>s[token]
        elif index == 11:
            utime = _number(s, token, token_end)
        elif index == 12:
            stime = _number(s, token, token_end)
        elif index == 19:
            start_ticks[0] = _number(s, token, token_end)
        elif index == 21:
            resident[0] = _number(s, token, token_end)
            break
        if token_end >= n:
            break
        token = token_end + 1
        index += 1
    if utime >= 0 and stime >= 0:
        ticks[0] = _final(_add(utime, stime))


# Python-visible parsers, one per file format, for the differential tests.

def parse_number(bytes token):
    return _number(token, 0, len(token))

def parse_single(bytes data):
    return _single(data, len(data))

def parse_keyed(bytes data, bytes key):
    return _keyed(data, len(data), key, len(key))

def parse_io_v2(bytes data):
    cdef int64_t r, w
    _io_v2(data, len(data), &r, &w)
    return r, w

def parse_blkio_v1(bytes data):
    cdef int64_t r, w
    _blkio_v1(data, len(data), &r, &w)
    return r, w

def parse_proc_io(bytes data):
    return _keyed(data, len(data), b"read_bytes:", 11), _keyed(data, len(data), b"write_bytes:", 12)

def parse_proc_stat(bytes data):
    cdef int64_t state, ticks, start, resident
    _proc_stat(data, len(data), &state, &ticks, &start, &resident)
    return state, ticks, start, resident


cdef Py_ssize_t _read(int fd, char* buf) noexcept nogil:
    cdef Py_ssize_t got
    if fd < 0:
        return -1
    while True:
        got = pread(fd, buf, READ_LIMIT, 0)
        if got >= 0 or errno != EINTR:
            return got


def read_sample(int cpu_fd, int cpu_format, int memory_current_fd, int memory_stat_fd,
                int memory_stat_format, int io_fd, int io_format, int proc_stat_fd):
    """Re-read a worker's already open stat files at offset 0 and parse them into one sample."""
    cdef char buf[READ_LIMIT]
    cdef Py_ssize_t n
    cdef int64_t cpu_usec = -1, memory_current = -1, memory_rss = -1
    cdef int64_t io_read = -1, io_write = -1, state = -1, ticks = -1, start = -1, resident = -1
    with nogil:
        n = _read(cpu_fd, buf)
        if n >= 0:
            if cpu_format == CPU_V2_STAT:
                cpu_usec = _keyed(buf, n, b"usage_usec", 10)
            elif cpu_format == CPU_V1_USAGE_NS:
                cpu_usec = _single(buf, n)
                if cpu_usec >= 0:
                    cpu_usec = cpu_usec // 1000
        n = _read(memory_current_fd, buf)
        if n >= 0:
            memory_current = _single(buf, n)
        n = _read(memory_stat_fd, buf)
        if n >= 0:
            if memory_stat_format == MEMSTAT_V2:
                memory_rss = _keyed(buf, n, b"anon", 4)
            elif memory_stat_format == MEMSTAT_V1:
                memory_rss = _keyed(buf, n, b"total_rss", 9)
        n = _read(io_fd, buf)
        if n >= 0:
            if io_format == IO_V2_STAT:
                _io_v2(buf, n, &io_read, &io_write)
            elif io_format == IO_V1_BLKIO:
                _blkio_v1(buf, n, &io_read, &io_write)
            elif io_format == IO_PROC:
                io_read = _keyed(buf, n, b"read_bytes:", 11)
                io_write = _keyed(buf, n, b"write_bytes:", 12)
        n = _read(proc_stat_fd, buf)
        if n >= 0:
            _proc_stat(buf, n, &state, &ticks, &start, &resident)
    return StatSample(cpu_usec, memory_current, memory_rss, io_read, io_write, state, ticks, start,
                      resident)
