"""The base of every config section (``rbee/config.py`` and the sections kept beside it, such as
``rbee/pickconfig.py``): a section refuses unknown keys, so a typo is an error, never a default."""

from __future__ import annotations

import msgspec


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config section."""
