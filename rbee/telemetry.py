"""The contract's old home, kept as a re-export: the contract is the package ``rbee/contract/``
and a hive's bounds-fitting is ``rbee/hive/fitting.py``. New code imports from those."""

from __future__ import annotations

from .contract import *  # noqa: F403
from .contract import __all__ as _contract_names
from .hive.fitting import fit_gpu, fit_worker

__all__ = [*_contract_names, "fit_gpu", "fit_worker"]
