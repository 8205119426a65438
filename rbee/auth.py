"""Kept as a re-export of ``rbee/http/auth.py``, its home now."""

from .http.auth import *  # noqa: F403
