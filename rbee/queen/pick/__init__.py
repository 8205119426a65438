"""The queen's pick (``GET /v1/pick``): a model's best workers for the next request, from numpy
columns the registry keeps current (docs/pick.md)."""

from .index import PickIndex, PickUnavailable
from .route import pick_handler

__all__ = ["PickIndex", "PickUnavailable", "pick_handler"]
