"""The strings and empty lists a fleet repeats, held once: the registry's share of memory per
hive, and of the cyclic collector's work.

A decoded heartbeat has a new string object for every text figure, so 10,000 hives running the
same model on the same engine hold 80,000 copies of ``"llama-3-70b"``, of ``"vllm"``, of its
version, of the group name, and of the GPU's model name: about 2.2 KB of an eight-GPU,
eight-worker hive's 18 KB of decoded structs (tracemalloc). ``SharedText`` swaps each of those
fields for the one equal string it already holds, as the registry stores the heartbeat (before
anything else reads it: the stream's event and the pick's index see the shared strings too).
Only fields that hives repeat are shared; ids, UUIDs and hostnames are each hive's own.

An empty list is a new tracked object too, one per worker (``errors``) and two per GPU
(``faults``, ``errors``): 24 of an eight-GPU heartbeat's 44 tracked objects, which every young
collection of the cyclic collector walks while the heartbeat is young (docs/scale.md). Each is
swapped for ``EMPTY``, the one empty list every stored heartbeat shares, and each worker's
``gpu_indices`` (``[3]``: eight more) for the equal list held: the queen never mutates a stored
heartbeat. The whole swap costs about 5 µs a heartbeat.
"""

from __future__ import annotations

from ..contract import HiveHeartbeat

EMPTY: list = []
"""The empty list of every stored heartbeat's empty ``errors`` and ``faults`` (never mutated)."""
KEPT = 65_536
"""Distinct strings held at most; past it the table starts again (a fleet has a few hundred)."""


class SharedText:
    """One string object per distinct value of the repeated text fields."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._indices: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self._held) + len(self._indices)

    def share(self, heartbeat: HiveHeartbeat) -> None:
        """Swap ``heartbeat``'s repeated text fields (each worker's group, model, engine and
        engine version, each GPU's name) for the equal strings held, its empty ``errors`` and
        ``faults`` for ``EMPTY`` and its workers' ``gpu_indices`` for the equal lists held; the
        values are unchanged."""
        held, indices = self._held, self._indices
        if len(held) + len(indices) >= KEPT:
            held.clear()
            indices.clear()
        get = held.setdefault
        for worker in heartbeat.workers:
            worker.group = get(worker.group, worker.group)
            if not worker.errors:
                worker.errors = EMPTY
            if worker.gpu_indices:
                worker.gpu_indices = indices.setdefault(tuple(worker.gpu_indices),
                                                        worker.gpu_indices)
            if worker.model is not None:
                worker.model = get(worker.model, worker.model)
            engine = worker.engine
            if engine is not None:
                engine.engine = get(engine.engine, engine.engine)
                if engine.version is not None:
                    engine.version = get(engine.version, engine.version)
        for device in heartbeat.capabilities:
            device.name = get(device.name, device.name)
            if not device.faults:
                device.faults = EMPTY
            if not device.errors:
                device.errors = EMPTY
