"""The registry holds the strings, settings' figures and empty containers a fleet repeats once
(``rbee.queen.sharing``): two hives decoded from their own bytes end up holding the same model,
group, instance, engine, GPU-name, rate-window, limit and empty-container objects, and every value
reads as it was sent."""

from __future__ import annotations

import msgspec

from rbee.config import RegistrySettings
from rbee.contract import CollectorIssue, apply_delta, decode_heartbeat, decode_hive_frame, encode
from rbee.hive.channel import FrameMaker
from rbee.queen import sharing
from rbee.queen.registry import HiveRegistry
from tests.fleetload import eight_gpu_hive


def stored(registry: HiveRegistry, hive_id: str, seed: int):
    sent = eight_gpu_hive(hive_id, seed)
    registry.update_hive(decode_heartbeat(encode(sent)))  # strings of its own, as decoded
    return sent, registry.get_hive(hive_id)


def test_two_hives_share_their_repeated_strings_and_keep_their_values():
    registry = HiveRegistry(RegistrySettings())
    sent_a, a = stored(registry, "hive-a", 1)
    sent_b, b = stored(registry, "hive-b", 2)
    assert (a.workers, a.capabilities) == (sent_a.workers, sent_a.capabilities)
    assert (b.workers, b.capabilities) == (sent_b.workers, sent_b.capabilities)
    first, second = a.workers[0], b.workers[0]
    assert first.model == second.model and first.model is second.model
    assert first.group is second.group
    assert first.engine.engine is second.engine.engine
    assert first.engine.version is second.engine.version
    assert a.capabilities[0].name is b.capabilities[0].name
    assert a.capabilities[0].uuid == b.capabilities[0].uuid  # a hive's own: not shared
    assert a.capabilities[0].uuid is not b.capabilities[0].uuid
    assert first.errors == [] and first.errors is second.errors is sharing.EMPTY
    assert a.capabilities[0].faults is b.capabilities[1].errors is sharing.EMPTY
    assert first.gpu_indices == [0] and first.gpu_indices is second.gpu_indices
    assert a.workers[1].gpu_indices == [1]
    assert first.instance == "worker-000" and first.instance is second.instance
    assert first.metrics == {} and first.metrics is second.metrics is sharing.NO_METRICS
    for field in ("rate_window_s", "cpu_limit_pct", "memory_limit_mb"):
        assert getattr(first, field) is getattr(second, field), field
    assert first.engine.rate_window_s is second.engine.rate_window_s
    assert first.gpus[0].util_window_s is second.gpus[0].util_window_s
    assert a.capabilities[0].vram_total_mb is b.capabilities[0].vram_total_mb
    # measured figures are each heartbeat's own
    assert first.cpu_pct != second.cpu_pct and a.capabilities[0].util_pct is not \
        b.capabilities[0].util_pct


def test_a_deltas_new_workers_and_gpus_are_shared_and_the_kept_ones_left_as_they_are():
    """Over a channel the unchanged workers and GPUs are the last heartbeat's objects, shared
    already: only the delta's new ones are swapped, and every value reads as the hive sent it."""
    registry = HiveRegistry(RegistrySettings())
    maker = FrameMaker()
    first = eight_gpu_hive("hive-a", 1)
    base = decode_hive_frame(maker.frame(first, snapshot=True)).heartbeat
    registry.update_hive(base)
    kept = base.workers[1]
    kept_group = kept.group
    fresh = eight_gpu_hive("hive-a", 2)
    sent = msgspec.structs.replace(first, timestamp=fresh.timestamp,
                                   workers=[fresh.workers[0], *first.workers[1:]],
                                   capabilities=fresh.capabilities)
    delta = decode_hive_frame(maker.frame(sent, snapshot=False))
    assert len(delta.workers) == 1 and len(delta.gpus) == 8
    registry.update_hive(apply_delta(base, delta))
    stored = registry.get_hive("hive-a")
    assert (stored.workers, stored.capabilities) == (sent.workers, sent.capabilities)
    assert stored.workers[1] is kept and kept.group is kept_group
    new = stored.workers[0]
    assert new is not base.workers[0] and new.errors is sharing.EMPTY
    assert new.group is kept.group and new.model is base.workers[0].model
    assert stored.capabilities[0].faults is sharing.EMPTY
    assert stored.capabilities[0].name is base.capabilities[0].name
    # one string per GPU however many beats: the new GPU's UUID is the last one's, and every
    # worker's use of it points at the same
    assert stored.capabilities[0] is not base.capabilities[0]
    assert stored.capabilities[0].uuid is base.capabilities[0].uuid
    assert all(use.uuid is stored.capabilities[use.index].uuid
               for worker in stored.workers for use in worker.gpus)


def test_a_heartbeat_with_errors_keeps_them():
    registry = HiveRegistry(RegistrySettings())
    sent = eight_gpu_hive("hive-a", 1)
    sent.workers[0].errors = [CollectorIssue(collector="nvml", message="no GPU")]
    registry.update_hive(decode_heartbeat(encode(sent)))
    stored_workers = registry.get_hive("hive-a").workers
    assert stored_workers[0].errors == [CollectorIssue(collector="nvml", message="no GPU")]
    assert stored_workers[1].errors is sharing.EMPTY and sharing.EMPTY == []


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(sharing, "KEPT", 10)
    registry = HiveRegistry(RegistrySettings(new_hives_burst=100, max_hives=100))
    texts = registry._texts
    for n in range(30):
        sent = eight_gpu_hive(f"hive-{n}", n)
        for worker in sent.workers:
            worker.model = f"model-{n}-{worker.instance}"
        registry.update_hive(sent)
        assert len(texts) <= 10 + 8 * 3 + 8  # what one heartbeat adds past the bound
    assert registry.get_hive("hive-29").workers[0].model == "model-29-worker-000"
