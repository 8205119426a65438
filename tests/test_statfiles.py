"""The Cython stat parser and its pure-Python twin: loaded, correct on real formats, identical.

Fixture texts are copied from real kernels (cgroup v2 cpu.stat/memory.stat/io.stat, v1 files,
/proc/<pid>/stat with a hostile command name), since this machine's v2 mount has no memory or io
controller to produce them live.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbee import _pystat, statfiles
from rbee._sample import (
    CPU_V1_USAGE_NS,
    CPU_V2_STAT,
    IO_PROC,
    IO_V1_BLKIO,
    IO_V2_STAT,
    MEMSTAT_V1,
    MEMSTAT_V2,
)
from tests.extkit import extension

_cstat, needs_cstat = extension("_cstat", "test_c_parser_loaded")

CPU_STAT_V2 = (b"usage_usec 8123456\nuser_usec 6000000\nsystem_usec 2123456\n"
               b"core_sched.force_idle_usec 0\nnr_periods 120\nnr_throttled 7\n"
               b"throttled_usec 35000\nnr_bursts 0\nburst_usec 0\n")
MEMORY_STAT_V2 = (b"anon 52428800\nfile 10485760\nkernel 1048576\nkernel_stack 65536\n"
                  b"pagetables 131072\nsec_pagetables 0\npercpu 1200\nsock 0\nvmalloc 0\n"
                  b"shmem 0\nzswap 0\nzswapped 0\nfile_mapped 4194304\nfile_dirty 0\n"
                  b"anon_thp 0\nfile_thp 0\nshmem_thp 0\ninactive_anon 52000000\n")
IO_STAT_V2 = (b"8:0 rbytes=1048576 wbytes=2097152 rios=10 wios=20 dbytes=0 dios=0\n"
              b"259:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n")
BLKIO_V1 = (b"8:0 Read 1048576\n8:0 Write 2097152\n8:0 Sync 0\n8:0 Async 3145728\n"
            b"8:0 Discard 0\n8:0 Total 3145728\n253:0 Read 4096\n253:0 Write 8192\n"
            b"253:0 Total 12288\nTotal 3158016\n")
MEMORY_STAT_V1 = b"cache 1000\nrss 2000\nrss_huge 0\nmapped_file 10\ntotal_cache 1000\ntotal_rss 3000\n"
PROC_IO = (b"rchar: 5000\nwchar: 6000\nsyscr: 7\nsyscw: 8\nread_bytes: 4096\n"
           b"write_bytes: 65536\ncancelled_write_bytes: 0\n")
PROC_STAT = (b"4242 (my (evil) worker) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 3 0 "
             b"987654 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
             b"\n")

PARSERS = [pytest.param(_pystat, id="py-parser"),
           pytest.param(_cstat, id="c-parser", marks=needs_cstat)]


def test_c_parser_loaded():
    """Fails when the extension is not built or silently did not load (unless the twin was asked
    for): the one test here that runs, and fails, exactly when ``rbee._cstat`` is missing."""
    assert _cstat is not None, "the Cython extension rbee._cstat is not built"
    expected = "python" if os.environ.get("RBEE_PUREPYTHON") else "cython"
    assert statfiles.IMPLEMENTATION == expected


@pytest.mark.parametrize("parser", PARSERS)
def test_real_formats(parser):
    assert parser.parse_keyed(CPU_STAT_V2, b"usage_usec") == 8123456
    assert parser.parse_keyed(MEMORY_STAT_V2, b"anon") == 52428800
    assert parser.parse_keyed(MEMORY_STAT_V1, b"total_rss") == 3000
    assert parser.parse_io_v2(IO_STAT_V2) == (1048576 + 4096, 2097152 + 8192)
    assert parser.parse_blkio_v1(BLKIO_V1) == (1048576 + 4096, 2097152 + 8192)
    assert parser.parse_proc_io(PROC_IO) == (4096, 65536)
    assert parser.parse_proc_stat(PROC_STAT) == (ord("S"), 175, 987654, 2048)
    assert parser.parse_single(b"123456\n") == 123456
    assert parser.parse_single(b"max\n") == -1
    assert parser.parse_io_v2(b"") == (0, 0)
    assert parser.parse_number(b"9223372036854775807") == 2**63 - 1
    assert parser.parse_number(b"9223372036854775808") == -1


@pytest.mark.parametrize("parser", PARSERS)
def test_read_sample_on_v2_fixture_tree(parser, tmp_path):
    """A v2 worker cgroup laid out as the kernel lays it out, read through open descriptors."""
    files = {"cpu.stat": CPU_STAT_V2, "memory.current": b"67108864\n", "memory.stat": MEMORY_STAT_V2,
             "io.stat": IO_STAT_V2, "stat": PROC_STAT}
    fds = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        fds[name] = os.open(tmp_path / name, os.O_RDONLY)
    try:
        sample = parser.read_sample(fds["cpu.stat"], CPU_V2_STAT, fds["memory.current"],
                                    fds["memory.stat"], MEMSTAT_V2, fds["io.stat"], IO_V2_STAT,
                                    fds["stat"])
        assert tuple(sample) == (8123456, 67108864, 52428800, 1052672, 2105344, ord("S"), 175,
                                 987654, 2048)
        # Re-read at offset 0 sees new content without reopening.
        (tmp_path / "cpu.stat").write_bytes(CPU_STAT_V2.replace(b"8123456", b"9000000"))
        again = parser.read_sample(fds["cpu.stat"], CPU_V2_STAT, -1, -1, 0, -1, 0, -1)
        assert again.cpu_usage_usec == 9000000 and again.proc_state == -1
    finally:
        for fd in fds.values():
            os.close(fd)


def _sample_both(paths, formats):
    fds = [os.open(p, os.O_RDONLY) if p else -1 for p in paths]
    try:
        args = (fds[0], formats[0], fds[1], fds[2], formats[1], fds[3], formats[2], fds[4])
        return _pystat.read_sample(*args), _cstat.read_sample(*args)
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


@needs_cstat
def test_both_read_the_same_live_files():
    """Same descriptors, same moment: the twins agree on this process's real /proc files."""
    pid = os.getpid()
    python, cython = _sample_both([None, None, None, f"/proc/{pid}/io", f"/proc/{pid}/stat"],
                                  (0, 0, IO_PROC))
    assert python._replace(proc_cpu_ticks=0) == cython._replace(proc_cpu_ticks=0)
    assert python.proc_state == ord("R")


# -- differential property tests ----------------------------------------------------------

KEYS = [b"usage_usec", b"anon", b"total_rss", b"read_bytes:", b"rbytes=1", b""]
numbers = st.one_of(st.integers(0, 2**64 + 5), st.integers(-5, 5)).map(lambda n: str(n).encode())
tokens = st.one_of(numbers, st.sampled_from([b"Read", b"Write", b"Total", b"8:0", b"rbytes=",
                   b"wbytes=", b"rbytes=12", b"wbytes=x", b"(", b")", b") ", b"", b"max", b"S",
                   *KEYS]), st.binary(max_size=6))
lines = st.lists(tokens, max_size=8).map(b" ".join)
documents = st.one_of(st.lists(lines, max_size=12).map(b"\n".join), st.binary(max_size=300))


def well_formed_io(values):
    return b"".join(b"%d:%d rbytes=%d wbytes=%d rios=1 wios=1 dbytes=0 dios=0\n" % v for v in values)


@needs_cstat
@settings(max_examples=400, deadline=None)
@given(documents, st.sampled_from(KEYS))
def test_twins_agree_on_any_input(data, key):
    for name in ("parse_single", "parse_io_v2", "parse_blkio_v1", "parse_proc_io",
                 "parse_proc_stat"):
        assert getattr(_pystat, name)(data) == getattr(_cstat, name)(data), name
    assert _pystat.parse_keyed(data, key) == _cstat.parse_keyed(data, key)
    assert _pystat.parse_number(data) == _cstat.parse_number(data)


@needs_cstat
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 15), st.integers(0, 2**62),
                          st.integers(0, 2**62)), max_size=6))
def test_twins_agree_on_well_formed_io_stat(values):
    data = well_formed_io(values)
    expected_read = sum(v[2] for v in values)
    expected_write = sum(v[3] for v in values)
    cap = lambda total: total if total < 2**63 else -1
    assert _pystat.parse_io_v2(data) == _cstat.parse_io_v2(data) == (cap(expected_read),
                                                                      cap(expected_write))


@needs_cstat
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40).map(str.encode), st.sampled_from(b"RSDZXT"),
       st.lists(st.integers(0, 2**40), min_size=50, max_size=50))
def test_twins_agree_on_well_formed_proc_stat(comm, state, fields):
    data = b"1 (" + comm + b") " + bytes([state]) + b" " + b" ".join(b"%d" % f for f in fields)
    expected = (state, fields[10] + fields[11], fields[18], fields[20])
    assert _pystat.parse_proc_stat(data) == _cstat.parse_proc_stat(data) == expected


@needs_cstat
@pytest.mark.parametrize("layout", [
    ("cpuacct", CPU_V1_USAGE_NS, MEMSTAT_V1, IO_V1_BLKIO),
    ("v2", CPU_V2_STAT, MEMSTAT_V2, IO_V2_STAT),
])
@settings(max_examples=60, deadline=None)
@given(contents=st.lists(documents, min_size=5, max_size=5))
def test_twins_agree_on_read_sample(tmp_path_factory, layout, contents):
    directory = tmp_path_factory.mktemp("sample")
    paths = []
    for index, content in enumerate(contents):
        path = directory / f"f{index}"
        path.write_bytes(content)
        paths.append(str(path))
    python, cython = _sample_both(paths, layout[1:])
    assert python == cython
