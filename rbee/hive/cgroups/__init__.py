"""Cgroup backends behind one interface: v2, v1 and none (see ``detect`` for the choice)."""

from .base import CgroupBackend, Placement, StatPaths
from .detect import select_backend
from .none import NoCgroup
from .v1 import CgroupV1
from .v2 import CgroupV2

__all__ = ["CgroupBackend", "CgroupV1", "CgroupV2", "NoCgroup", "Placement", "StatPaths",
           "select_backend"]
