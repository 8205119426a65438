"""A channel frame's payload unmasked (RFC 6455 5.3) by the Cython extension ``rbee._cmask`` and by
its pure-Python twin (``rbee/http/masking.py``): the same bytes for every size, offset and key,
either way the XOR is computed (8 bytes at a time in C, numpy or one big integer in the twin)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbee.http import masking
from tests.extkit import extension

_cmask, needs_cmask = extension("_cmask", "test_c_unmask_loaded")
UNMASKS = [pytest.param(masking.py_unmask, id="py"),
           pytest.param(None if _cmask is None else _cmask.unmask, id="c", marks=needs_cmask)]


def xored(data: bytes, start: int, size: int, mask: bytes) -> bytes:
    """The RFC's definition, a byte at a time."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data[start:start + size]))


def test_c_unmask_loaded():
    """Fails when the extension is not built or silently did not load (unless the twin was asked
    for): the one test here that runs, and fails, exactly when ``rbee._cmask`` is missing."""
    assert _cmask is not None, "the Cython extension rbee._cmask is not built"
    expected = "python" if os.environ.get("RBEE_PUREPYTHON") else "cython"
    assert masking.IMPLEMENTATION == expected
    assert masking.unmask is (masking.py_unmask if expected == "python" else _cmask.unmask)


@pytest.mark.parametrize("unmask", UNMASKS)
@pytest.mark.parametrize("size", [0, 1, 3, 7, 8, 9, 63, 64, 65, 127, 3601, 70_001])
def test_unmask(unmask, size):
    data = os.urandom(size + 7)
    mask = os.urandom(4)
    assert unmask(data, 5, size, mask) == xored(data, 5, size, mask)


@needs_cmask
@given(st.binary(max_size=300), st.integers(0, 40), st.integers(0, 300), st.binary(min_size=4,
                                                                                   max_size=4))
def test_the_twins_agree(payload, start, size, mask):
    data = os.urandom(start) + payload
    size = min(size, len(data) - start)
    assert _cmask.unmask(data, start, size, mask) == masking.py_unmask(data, start, size, mask)


@pytest.mark.parametrize("unmask", UNMASKS)
def test_any_bytes_like(unmask):
    """A TLS stream reads bytearrays: the same bytes come back, as bytes."""
    data, mask = os.urandom(100), os.urandom(4)
    got = unmask(bytearray(data), 3, 90, bytearray(mask))
    assert type(got) is bytes and got == xored(data, 3, 90, mask)


@pytest.mark.parametrize("unmask", UNMASKS)
@pytest.mark.parametrize(("start", "size", "mask", "problem"), [
    (0, 11, b"abcd", "11 bytes from 0 are not within 10"),
    (8, 3, b"abcd", "3 bytes from 8 are not within 10"),
    (-1, 2, b"abcd", "2 bytes from -1 are not within 10"),
    (0, 2, b"abc", "a WebSocket mask is 4 bytes, not 3"),
])
def test_out_of_range_is_refused_by_name(unmask, start, size, mask, problem):
    """Never a read past the payload: the caller's bug is named, not answered with memory."""
    with pytest.raises(ValueError, match=problem):
        unmask(b"0123456789", start, size, mask)
