"""The contract's old home, kept as a re-export for code written against it (plugins, scripts):
the contract is the package ``rbee.contract``, and rbee itself imports from there. A hive's
bounds-fitting (``fit_worker``, ``fit_gpu``) lives with the hive: ``rbee.hive.fitting``."""

from __future__ import annotations

from .contract import *  # noqa: F403
