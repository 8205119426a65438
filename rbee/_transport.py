"""Kept as a re-export of ``rbee/http/transport.py``, its home now."""

from .http.transport import *  # noqa: F403
