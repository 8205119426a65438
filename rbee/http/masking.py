"""Unmasking a client's WebSocket payload, chosen in one place: the Cython extension
(``ext/_cmask.pyx``, every channel frame's hot path), else the pure-Python twin here.

``RBEE_PUREPYTHON=1`` forces the twin (as for the stat parser, ``rbee/statfiles.py``); otherwise
the extension is used when it was built, and ``IMPLEMENTATION`` says which one runs.
"""

from __future__ import annotations

import os

PY_IMPLEMENTATION = "python"


def py_unmask(data: bytes, start: int, size: int, mask: bytes) -> bytes:
    """``size`` bytes of ``data`` from ``start``, XORed with the 4-byte ``mask`` repeated."""
    if len(mask) != 4:
        raise ValueError(f"a WebSocket mask is 4 bytes, not {len(mask)}")
    if start < 0 or size < 0 or start + size > len(data):
        raise ValueError(f"{size} bytes from {start} are not within {len(data)}")
    if size < 64:  # numpy's call overhead is more than the XOR itself
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
        return (int.from_bytes(data[start:start + size], "little") ^ key).to_bytes(size, "little")
    import numpy as np  # here: a hive (rawchannel serves its API too) never loads numpy

    keys = np.frombuffer(mask * (size // 4 + 1), np.uint8, size)
    return (np.frombuffer(data, np.uint8, size, start) ^ keys).tobytes()


if os.environ.get("RBEE_PUREPYTHON"):
    IMPLEMENTATION, unmask = PY_IMPLEMENTATION, py_unmask
else:
    try:
        from .._cmask import IMPLEMENTATION, unmask
    except ImportError:  # extension not built: identical results, just slower
        IMPLEMENTATION, unmask = PY_IMPLEMENTATION, py_unmask

__all__ = ["IMPLEMENTATION", "py_unmask", "unmask"]
