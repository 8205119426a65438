"""Kept as a re-export of ``rbee/http/tls.py``, its home now."""

from .http.tls import *  # noqa: F403
