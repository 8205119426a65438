"""What the history keeps of one hive: which rows hold its series, and for which workers and GPUs."""

from __future__ import annotations

import numpy as np

NO_ROWS = np.zeros(0, np.intp)


class HiveRows:
    """The rows of one hive's series."""

    __slots__ = ("gpu_dest", "gpu_index", "gpu_rows", "groups", "held_gpus", "held_workers",
                 "idle", "indices", "instances", "live", "plugin_rows", "refused_at",
                 "refused_whole", "seen_at", "uuids", "worker_dest", "worker_rows")

    def __init__(self) -> None:
        self.groups: tuple[str, ...] = ()
        """The group of each worker of its heartbeat, in order (then ``instances``, the GPUs'
        ``uuids`` and ``indices``): what the rows were laid out for."""
        self.instances: tuple[str, ...] = ()
        self.uuids: tuple[str, ...] = ()
        self.indices: tuple[int, ...] = ()
        self.worker_rows: dict[tuple[str, str], int] = {}
        """(group, instance): the first of its nine rows; -1 when refused by the budget."""
        self.gpu_rows: dict[str, int] = {}
        self.gpu_index: dict[str, int] = {}
        self.plugin_rows: dict[tuple[str, str], dict[str, int]] = {}
        """(group, instance): each plugin figure's row in the plugin store."""
        self.worker_dest = NO_ROWS
        self.gpu_dest = NO_ROWS
        self.idle: dict[tuple, float] = {}
        """Workers (group, instance) and GPUs (uuid) no longer reported: since when."""
        self.live = False
        self.seen_at = 0.0
        """When a step last found it fresh in the registry."""
        self.refused_at = -1
        """When some of its series were refused by the budget: ``FleetHistory._released`` then
        (it is laid out again once a run of rows has been freed since; -1: none refused)."""
        self.refused_whole = False
        """All of them were: it is not gathered at all until then."""
        self.held_workers = 0
        """Workers (then GPUs) with rows, those refused by the budget left out."""
        self.held_gpus = 0

    def recount(self) -> None:
        self.held_workers = sum(first >= 0 for first in self.worker_rows.values())
        self.held_gpus = sum(first >= 0 for first in self.gpu_rows.values())
