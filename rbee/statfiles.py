"""Chooses the stat-file parser in one place: the Cython extension, else its pure-Python twin.

``RBEE_PUREPYTHON=1`` forces the twin (tests run both); otherwise the extension is used when it was
built, and the fallback is silent only in the sense that ``IMPLEMENTATION`` says which one runs.
"""

from __future__ import annotations

import os

from ._sample import StatSample

if os.environ.get("RBEE_PUREPYTHON"):
    from ._pystat import IMPLEMENTATION, read_sample
else:
    try:
        from ._cstat import IMPLEMENTATION, read_sample
    except ImportError:  # extension not built: identical results, just slower
        from ._pystat import IMPLEMENTATION, read_sample

__all__ = ["IMPLEMENTATION", "StatSample", "read_sample"]
