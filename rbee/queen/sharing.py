"""The strings, figures and empty containers a fleet repeats, held once: the registry's share of
memory per hive, and of the cyclic collector's work.

A decoded heartbeat has a new object for every figure, so 10,000 hives running the same model on
the same engine hold 80,000 copies of ``"llama-3-70b"``, of ``"vllm"``, of its version, of the
group and instance names (``worker-0`` on every hive), of the GPU's model name and of its total
VRAM, and of each setting a worker reports (its rate window, its limits). ``SharedText`` swaps
each of those fields for the one equal object it already holds, as the registry stores the
heartbeat (before anything else reads it: the stream's event and the pick's index see the shared
objects too). Only fields that hives repeat are shared; hive ids, UUIDs and hostnames are each
hive's own, and measured figures (use, temperature, rates) are new every beat.

An empty list or dict is a new object too, tracked by the cyclic collector: one list per worker
(``errors``) and two per GPU (``faults``, ``errors``), and each worker's ``metrics`` without
plugin figures. Each is swapped for ``EMPTY`` or ``NO_METRICS``, the ones every stored heartbeat
shares, and each worker's ``gpu_indices`` (``[3]``) for the equal list held: the queen never
mutates a stored heartbeat. At an eight-GPU, eight-worker hive this is 2.6 KB of its ~15 KB
(docs/scale.md). A channel's delta keeps the unchanged workers and GPUs of the last heartbeat,
already shared, so only the new ones are swapped.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..contract import GpuDevice, HiveHeartbeat

EMPTY: list = []
"""The empty list of every stored heartbeat's empty ``errors`` and ``faults`` (never mutated)."""
NO_METRICS: dict = {}
"""The empty dict of every stored worker without plugin figures (never mutated)."""
KEPT = 65_536
"""Distinct strings held at most; past it the table starts again (a fleet has a few hundred)."""


class SharedText:
    """One object per distinct value of the repeated fields."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._floats: dict[float, float] = {}
        self._indices: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self._held) + len(self._floats) + len(self._indices)

    def share(self, heartbeat: HiveHeartbeat, last: Iterable[GpuDevice] = ()) -> None:
        """Swap ``heartbeat``'s repeated fields for the equal objects held: each worker's group,
        instance, model, engine and engine version, its settings' figures (``rate_window_s``,
        ``cpu_limit_pct``, ``memory_limit_mb``, the engine's ``rate_window_s``, each GPU use's
        ``util_window_s``); each GPU's name and ``vram_total_mb``; the empty ``errors``,
        ``faults`` and ``metrics`` for ``EMPTY`` and ``NO_METRICS``, and the workers'
        ``gpu_indices`` for the equal lists held. The values are unchanged.

        A GPU's ``uuid`` becomes the string of the hive's ``last`` GPUs with that UUID (the
        hive's GPUs as stored before), and each GPU use's ``uuid`` its GPU's: one string per
        GPU however many beats (UUIDs are each hive's own, so a fleet-wide table would not
        hold them).

        A worker or GPU already shared (its ``errors`` or ``faults`` is ``EMPTY``: a channel's
        delta keeps the unchanged ones of the hive's last heartbeat) is skipped."""
        held, floats, indices = self._held, self._floats, self._indices
        if len(held) + len(floats) + len(indices) >= KEPT:
            held.clear()
            floats.clear()
            indices.clear()
        get, number = held.setdefault, floats.setdefault
        last_uuids: dict[str, str] | None = None
        for device in heartbeat.capabilities:
            if device.faults is EMPTY:
                continue
            if last_uuids is None:
                last_uuids = {gpu.uuid: gpu.uuid for gpu in last}
            device.uuid = last_uuids.get(device.uuid, device.uuid)
            device.name = get(device.name, device.name)
            device.vram_total_mb = number(device.vram_total_mb, device.vram_total_mb)
            if not device.faults:
                device.faults = EMPTY
            if not device.errors:
                device.errors = EMPTY
        uuids: dict[str, str] | None = None
        for worker in heartbeat.workers:
            if worker.errors is EMPTY:
                continue
            worker.group = get(worker.group, worker.group)
            worker.instance = get(worker.instance, worker.instance)
            if not worker.errors:
                worker.errors = EMPTY
            if not worker.metrics:
                worker.metrics = NO_METRICS
            if worker.gpu_indices:
                worker.gpu_indices = indices.setdefault(tuple(worker.gpu_indices),
                                                        worker.gpu_indices)
            if worker.model is not None:
                worker.model = get(worker.model, worker.model)
            worker.rate_window_s = number(worker.rate_window_s, worker.rate_window_s)
            if worker.cpu_limit_pct is not None:
                worker.cpu_limit_pct = number(worker.cpu_limit_pct, worker.cpu_limit_pct)
            if worker.memory_limit_mb is not None:
                worker.memory_limit_mb = number(worker.memory_limit_mb, worker.memory_limit_mb)
            for use in worker.gpus:
                use.util_window_s = number(use.util_window_s, use.util_window_s)
                if uuids is None:
                    uuids = {gpu.uuid: gpu.uuid for gpu in heartbeat.capabilities}
                use.uuid = uuids.get(use.uuid, use.uuid)
            engine = worker.engine
            if engine is not None:
                engine.engine = get(engine.engine, engine.engine)
                engine.rate_window_s = number(engine.rate_window_s, engine.rate_window_s)
                if engine.version is not None:
                    engine.version = get(engine.version, engine.version)
