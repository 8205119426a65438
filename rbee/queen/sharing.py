"""The strings a fleet repeats, held once: the registry's share of memory per hive.

A decoded heartbeat has a new string object for every text figure, so 10,000 hives running the
same model on the same engine hold 80,000 copies of ``"llama-3-70b"``, of ``"vllm"``, of its
version, of the group name, and of the GPU's model name: about 2.2 KB of an eight-GPU,
eight-worker hive's 18 KB of decoded structs (tracemalloc). ``SharedText`` swaps each of those
fields for the one equal string it already holds, as the registry stores the heartbeat (before
anything else reads it: the stream's event and the pick's index see the shared strings too).
It costs about 4 µs a heartbeat. Only fields that hives repeat are shared; ids, UUIDs and
hostnames are each hive's own.
"""

from __future__ import annotations

from ..contract import HiveHeartbeat

KEPT = 65_536
"""Distinct strings held at most; past it the table starts again (a fleet has a few hundred)."""


class SharedText:
    """One string object per distinct value of the repeated text fields."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._held)

    def share(self, heartbeat: HiveHeartbeat) -> None:
        """Swap ``heartbeat``'s repeated text fields (each worker's group, model, engine and
        engine version, each GPU's name) for the equal strings held; the values are unchanged."""
        held = self._held
        if len(held) >= KEPT:
            held.clear()
        get = held.setdefault
        for worker in heartbeat.workers:
            worker.group = get(worker.group, worker.group)
            if worker.model is not None:
                worker.model = get(worker.model, worker.model)
            engine = worker.engine
            if engine is not None:
                engine.engine = get(engine.engine, engine.engine)
                if engine.version is not None:
                    engine.version = get(engine.version, engine.version)
        for device in heartbeat.capabilities:
            device.name = get(device.name, device.name)
