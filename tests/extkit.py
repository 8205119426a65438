"""The Cython extensions (``ext/``) as the tests of their twins see them: the module, or None
when it was not built, and the skip mark for the tests that need it (named after the one test
per extension that fails when it is missing)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def extension(name: str, loaded_test: str) -> tuple[ModuleType | None, pytest.MarkDecorator]:
    """``rbee.<name>`` and ``needs``, a skipif mark for when it is not built: ``loaded_test``,
    the test that asserts it is, fails then, so a missing build is never a silent skip."""
    try:
        module: ModuleType | None = importlib.import_module(f"rbee.{name}")
    except ImportError:
        module = None
    needs = pytest.mark.skipif(module is None, reason=(
        f"the Cython extension rbee.{name} is not built ({loaded_test} fails for it)"))
    return module, needs
