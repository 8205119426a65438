"""The pick's index against a real registry, on explicit clocks: it follows every change of the
registry (heartbeats, stale marks, sweeps, removals), counts picks in flight until the engine's
counters show them or their time runs out, and judges figures stale by their age."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rbee.config import PickSettings, RegistrySettings, parse_config
from rbee.contract import (
    Degraded,
    EngineState,
    GpuFault,
    GpuFaultKind,
    OperationalStatus,
    Unhealthy,
    WorkerState,
)
from rbee.queen.pick import PickIndex, PickUnavailable
from rbee.queen.registry import HiveRegistry
from rbee.queen.scheduling import WorkerQuery

from .builders import gpu, heartbeat, worker

T0 = 1_800_000_000.0
"""The wall clock's start (Unix seconds)."""


class Clocks:
    """The registry's clock and the wall clock, moved by hand."""

    def __init__(self) -> None:
        self.now, self.wall = 100.0, T0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


def at(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


def serving(instance: str, *, waiting: int = 0, running: int = 0, kv: float | None = None,
            sampled: float | None = T0, model: str = "m", **fields):
    engine = EngineState(engine="vllm", requests_running=running, requests_waiting=waiting,
                         kv_cache_pct=kv, sampled_at=at(sampled) if sampled else None)
    return worker(instance, model=model, endpoint=f"http://10.0.0.1:{8000 + int(instance[1:])}",
                  engine=engine, **fields)


def make(clocks: Clocks, settings: RegistrySettings | None = None,
         **pick) -> tuple[HiveRegistry, PickIndex]:
    registry = HiveRegistry(settings or RegistrySettings(), clock=lambda: clocks.now)
    index = PickIndex(parse_config(pick, PickSettings), registry.settings,
                      clock=lambda: clocks.now, wall=lambda: clocks.wall)
    registry.observe(index.hive_changed)
    return registry, index


def names(answer) -> list[str]:
    return [w.instance for w in answer.picked]


MODEL = WorkerQuery(model="m")


def test_score_orders_by_queue_running_kv_and_gpu_health():
    clocks = Clocks()
    registry, index = make(clocks)
    degraded = gpu(1, total_gib=80, used_gib=1)
    degraded.health = Degraded(reason="thermal")
    degraded.faults = [GpuFault(kind=GpuFaultKind.THERMAL_SLOWDOWN, detail="hot", fatal=False)]
    registry.update_hive(heartbeat("h", [
        serving("w1", waiting=2),                   # 2.0
        serving("w2", running=3),                   # 1.5
        serving("w3", kv=50.0),                     # 2.0 * ... = 4.0 * 0.5 = 2.0
        serving("w4", running=1, gpu_indices=[1]),  # 0.5 + 2.0 (degraded GPU)
        serving("w5"),                              # 0.0
    ], [gpu(0, total_gib=80, used_gib=1), degraded]))
    answer = index.pick(MODEL, n=5)
    assert names(answer) == ["w5", "w2", "w1", "w3", "w4"]
    assert [w.score for w in answer.picked] == [1.0, 1.5, 2.0, 2.0, 2.5]  # w5: its own pick
    assert answer.candidates == 5 and not answer.all_stale


def test_never_picked_without_endpoint_running_state_or_schedulable_hive():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [
        serving("w1"), worker("w2", model="m"),  # w2: no endpoint
        serving("w3", state=WorkerState.EXITED), serving("w4", model="other")]))
    registry.update_hive(heartbeat("busy-start", [serving("w5")],
                                   status=OperationalStatus.STARTING))
    answer = index.pick(MODEL, n=10)
    assert names(answer) == ["w1"] and answer.candidates == 1


def test_index_follows_stale_marks_sweeps_and_removals():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("a", [serving("w1")]))
    registry.update_hive(heartbeat("b", [serving("w2", waiting=1)]))
    registry.mark_stale("a")
    assert names(index.pick(MODEL, n=2)) == ["w2"]
    registry.update_hive(heartbeat("a", [serving("w1")]))  # back
    assert names(index.pick(MODEL, n=2)) == ["w1", "w2"]
    clocks.advance(registry.settings.stale_after_s + 1)
    registry.update_hive(heartbeat("b", [serving("w2", waiting=1)]))
    registry.sweep()  # a: silent past stale_after_s
    assert names(index.pick(MODEL, n=2)) == ["w2"]
    registry.remove_hive("b")
    with pytest.raises(PickUnavailable, match="no worker of model 'm' can be picked"):
        index.pick(MODEL)


def test_a_worker_that_changes_model_moves_table():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [serving("w1"), serving("w2")]))
    registry.update_hive(heartbeat("h", [serving("w1", model="n"), serving("w2")]))
    assert names(index.pick(MODEL, n=5)) == ["w2"]
    assert names(index.pick(WorkerQuery(model="n"), n=5)) == ["w1"]


def test_picks_in_a_row_spread_and_end_when_counters_rise():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [serving("w1"), serving("w2")]))
    first = index.pick(MODEL).picked[0]
    second = index.pick(MODEL).picked[0]
    assert {first.instance, second.instance} == {"w1", "w2"}
    assert first.in_flight == second.in_flight == 1 and first.score == 1.0
    clocks.advance(0.1)
    # w1's engine read after the picks, its queue unchanged: the pick is not in it yet
    registry.update_hive(heartbeat("h", [serving("w1", sampled=clocks.wall),
                                         serving("w2", waiting=1, sampled=clocks.wall)]))
    assert index.in_flight("m") == {"h/llm/w1": 1}
    # a reading from before the pick does not end it, even with a longer queue
    registry.update_hive(heartbeat("h", [serving("w1", waiting=1, sampled=T0 - 1),
                                         serving("w2", waiting=1, sampled=clocks.wall)]))
    assert index.in_flight("m") == {"h/llm/w1": 1}
    clocks.advance(0.1)
    registry.update_hive(heartbeat("h", [serving("w1", running=1, sampled=clocks.wall),
                                         serving("w2", waiting=1, sampled=clocks.wall)]))
    assert index.in_flight("m") == {}


def test_a_pick_ends_after_its_time_to_live():
    clocks = Clocks()
    registry, index = make(clocks, in_flight_ttl_ms=300)
    registry.update_hive(heartbeat("h", [serving("w1"), serving("w2", waiting=3)]))
    for _ in range(3):
        assert index.pick(MODEL).picked[0].instance == "w1"
    assert index.in_flight("m") == {"h/llm/w1": 3}
    assert index.pick(MODEL).picked[0].instance in ("w1", "w2")  # 3.0 each now
    clocks.advance(0.299)
    assert sum(index.in_flight("m").values()) == 4
    clocks.advance(0.002)
    assert index.in_flight("m") == {}


def test_only_the_first_of_an_answer_counts_in_flight():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [serving("w1"), serving("w2", waiting=1)]))
    answer = index.pick(MODEL, n=2)
    assert [(w.instance, w.in_flight) for w in answer.picked] == [("w1", 1), ("w2", 0)]


def test_stale_figures_saturate_or_are_skipped():
    clocks = Clocks()
    for policy in ("saturate", "skip"):
        registry, index = make(clocks, stale=policy, stale_after_ms=500)
        registry.update_hive(heartbeat("h", [
            serving("w1", sampled=T0 - 0.501),   # idle, but its figures are too old
            serving("w2", waiting=4, sampled=T0 - 0.499),
            worker("w3", model="m", endpoint="http://10.0.0.1:9"),  # no engine state at all
        ]))
        answer = index.pick(MODEL, n=3)
        if policy == "saturate":
            assert names(answer) == ["w2", "w1", "w3"]
            assert [w.stale for w in answer.picked] == [False, True, True]
            assert answer.picked[1].engine_age_ms == 501.0
            assert answer.picked[2].engine_age_ms is None
        else:
            assert names(answer) == ["w2"] and answer.skipped_stale == 2
        assert answer.candidates == 3 and not answer.all_stale


def test_every_candidate_stale_fails_open_or_refuses():
    clocks = Clocks()
    registry, index = make(clocks, stale_after_ms=500)
    registry.update_hive(heartbeat("h", [serving("w1", waiting=2), serving("w2")]))
    clocks.advance(0.6)
    answer = index.pick(MODEL, n=2)
    assert answer.all_stale and names(answer) == ["w2", "w1"]
    assert all(w.stale for w in answer.picked)
    assert answer.picked[0].heartbeat_age_ms == 600.0
    registry, index = make(clocks, stale_after_ms=500, all_stale="unavailable")
    registry.update_hive(heartbeat("h", [serving("w1", sampled=clocks.wall - 0.6)]))
    with pytest.raises(PickUnavailable, match=r"every one of the 1 candidates .* older than "
                                              r"pick.stale_after_ms \(500 ms\)"):
        index.pick(MODEL)


def test_without_sampled_at_the_age_runs_from_the_receipt():
    clocks = Clocks()
    registry, index = make(clocks, stale_after_ms=500)
    registry.update_hive(heartbeat("h", [serving("w1", sampled=None)]))
    clocks.advance(0.4)
    picked = index.pick(MODEL).picked[0]
    assert not picked.stale and picked.engine_age_ms == picked.heartbeat_age_ms == 400.0
    clocks.advance(0.2)
    assert index.pick(MODEL).picked[0].stale


def test_filters_of_the_workers_listing():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [
        serving("w1", waiting=3, kv=10.0, gpu_indices=[0], vram_mb=1024),
        serving("w2", running=1, kv=90.0, gpu_indices=[1], vram_mb=1024),
        serving("w3", kv=None),
    ], [gpu(0, total_gib=80, used_gib=70), gpu(1, total_gib=80, used_gib=10)]))
    assert names(index.pick(WorkerQuery(model="m", max_waiting=0), n=3)) == ["w3", "w2"]
    assert names(index.pick(WorkerQuery(model="m", max_kv_cache_pct=50), n=3)) == ["w1"]
    assert names(index.pick(WorkerQuery(model="m", min_free_vram_mb=20 * 1024), n=3)) == ["w2"]
    assert names(index.pick(WorkerQuery(model="m", idle=True), n=3)) == ["w3"]
    with pytest.raises(PickUnavailable, match=r"none of the 3 pickable workers of model 'm' "
                                              r"matches the filters \(idle=true, max_waiting=0"):
        index.pick(WorkerQuery(model="m", idle=True, max_waiting=0, max_kv_cache_pct=5), n=3)


def test_many_workers_grow_the_table_and_reuse_freed_slots():
    clocks = Clocks()
    registry, index = make(clocks)
    for hive in range(10):
        registry.update_hive(heartbeat(f"h{hive}", [
            serving(f"w{i}", waiting=(hive * 8 + i) % 7) for i in range(8)]))
    answer = index.pick(MODEL, n=80)
    assert answer.candidates == 80 and len(answer.picked) == 80
    assert [w.requests_waiting for w in answer.picked] == sorted(
        w.requests_waiting for w in answer.picked)
    for hive in range(5):
        registry.remove_hive(f"h{hive}")
    registry.update_hive(heartbeat("late", [serving("w0", waiting=9)]))
    answer = index.pick(MODEL, n=80)
    assert answer.candidates == 41 and answer.picked[-1].hive_id == "late"


def test_a_hive_clock_ahead_cannot_make_figures_younger_than_their_receipt():
    clocks = Clocks()
    registry, index = make(clocks, stale_after_ms=500)
    registry.update_hive(heartbeat("h", [serving("w1", sampled=T0 + 60)]))
    picked = index.pick(MODEL).picked[0]
    assert picked.engine_age_ms == 0.0 and not picked.stale
    clocks.advance(0.6)
    picked = index.pick(MODEL).picked[0]
    assert picked.stale and picked.engine_age_ms == picked.heartbeat_age_ms == 600.0


def test_a_worker_on_an_unhealthy_gpu_is_skipped_or_scored_as_degraded():
    broken = gpu(0, total_gib=80, used_gib=1)
    broken.health = Unhealthy(reason="ecc")
    workers = [serving("w1", gpu_indices=[0]), serving("w2", waiting=1, gpu_indices=[1])]
    clocks = Clocks()
    for skip in (True, False):
        registry, index = make(clocks, RegistrySettings(skip_unhealthy_gpus=skip))
        registry.update_hive(heartbeat("h", workers, [broken, gpu(1, total_gib=80, used_gib=1)]))
        answer = index.pick(MODEL, n=2)
        if skip:
            assert names(answer) == ["w2"]
        else:  # the degraded_gpu weight, 2.0, against one waiting request
            assert [(w.instance, w.score) for w in answer.picked] == [("w2", 2.0), ("w1", 2.0)]


def test_a_restarted_worker_is_offered_at_its_new_endpoint():
    clocks = Clocks()
    registry, index = make(clocks)
    registry.update_hive(heartbeat("h", [serving("w1")]))
    assert index.pick(MODEL).picked[0].endpoint == "http://10.0.0.1:8001"
    moved = serving("w1")
    moved.endpoint = "http://10.0.0.1:9001"
    registry.update_hive(heartbeat("h", [moved]))
    picked = index.pick(MODEL).picked[0]
    assert picked.endpoint == "http://10.0.0.1:9001" and picked.in_flight == 2  # same worker
