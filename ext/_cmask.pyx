# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython unmasking of a client's WebSocket payload: every frame a hive sends on its channel.

The XOR with the frame's 4-byte key runs 8 bytes at a time in C into the one bytes object
returned; the twin (``rbee/http/masking.py``) pays numpy's calls, or a big integer's, per frame,
3.6 us for a fleet heartbeat's 3.6 KB delta against 0.9 us here (measured alone; the frame
code with either: ``bench/test_bench_rawchannel.py``).
The websockets library ships the same operation in C for the same reason (``speedups.apply_mask``).
A differential test keeps the two identical.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

IMPLEMENTATION = "cython"


def unmask(data, Py_ssize_t start, Py_ssize_t size, mask):
    """``size`` bytes of ``data`` from ``start``, XORed with the 4-byte ``mask`` repeated. Any
    bytes-like object (a TLS stream reads bytearrays); bytes are read in place, others copied."""
    if type(data) is not bytes:
        data = bytes(data)
    if type(mask) is not bytes:
        mask = bytes(mask)
    if len(mask) != 4:
        raise ValueError(f"a WebSocket mask is 4 bytes, not {len(mask)}")
    if start < 0 or size < 0 or start + size > len(data):
        raise ValueError(f"{size} bytes from {start} are not within {len(data)}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    cdef const uint8_t* src = <const uint8_t*>PyBytes_AS_STRING(data) + start
    cdef const uint8_t* key = <const uint8_t*>PyBytes_AS_STRING(mask)
    cdef uint32_t key32
    cdef uint64_t key64, word
    cdef Py_ssize_t i = 0
    memcpy(&key32, key, 4)
    key64 = (<uint64_t>key32) | ((<uint64_t>key32) << 32)
    while i + 8 <= size:  # memcpy: unaligned loads and stores, one instruction each
        memcpy(&word, src + i, 8)
        word ^= key64
        memcpy(dst + i, &word, 8)
        i += 8
    while i < size:
        dst[i] = src[i] ^ key[i & 3]
        i += 1
    return out
