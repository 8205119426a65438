"""HiveRegistry: storage, scheduling queries, concurrency, stale cleanup.

The seed's 15 registry tests keep their names. Silence is driven by a manual monotonic clock (the
registry's only seam: the queen's ``time.monotonic``), so stale and removal thresholds are tested
exactly and instantly; the cleanup task inside a running queen is tested in test_queen_api.py.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import msgspec
import pytest
import trio

from rbee import AdmissionError, NotFoundError
from rbee.config import RegistrySettings
from rbee.contract import (
    Degraded,
    EngineState,
    OperationalStatus,
    Unhealthy,
    WorkerGpuUse,
    WorkerState,
)
from rbee.queen.registry import HiveRegistry
from rbee.queen.scheduling import WorkerQuery, idle_instances, is_idle

from .builders import GIB, gpu, heartbeat, worker


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def registry(clock) -> HiveRegistry:
    return HiveRegistry(RegistrySettings(stale_after_s=3, remove_after_s=10, idle_gpu_util_pct=5,
                                         established_after_s=5), clock=clock)


def ids(found) -> list[str]:
    return [w.id for w in found]


# -- storage ------------------------------------------------------------------------------


def test_update_workers_stores_correctly(registry):
    registry.update_hive(heartbeat("hive-a"))
    registry.update_workers("hive-a", [worker("a", pid=11), worker("b", pid=12)])
    stored = registry.get_workers("hive-a")
    assert [(w.instance, w.pid) for w in stored] == [("a", 11), ("b", 12)]


def test_get_workers_returns_stored(registry):
    sent = [worker("a", model="qwen", cpu_pct=33.0), worker("b", model=None)]
    registry.update_hive(heartbeat("hive-a", sent))
    assert registry.get_workers("hive-a") == sent
    assert registry.get_workers("no-such-hive") == []


def test_get_all_workers_flattens(registry):
    registry.update_hive(heartbeat("hive-a", [worker("a1"), worker("a2")]))
    registry.update_hive(heartbeat("hive-b", [worker("b1")]))
    assert ids(registry.get_all_workers()) == ["hive-a/llm/a1", "hive-a/llm/a2", "hive-b/llm/b1"]


def test_update_workers_replaces_existing(registry):
    registry.update_hive(heartbeat("hive-a", [worker("a"), worker("b")]))
    registry.update_hive(heartbeat("hive-a", [worker("c")]))
    assert [w.instance for w in registry.get_workers("hive-a")] == ["c"]
    registry.update_workers("hive-a", [worker("d"), worker("e")])
    registry.update_workers("hive-a", [worker("d"), worker("e")])
    assert [w.instance for w in registry.get_workers("hive-a")] == ["d", "e"]


def test_update_workers_unknown_hive_is_an_error(registry):
    with pytest.raises(NotFoundError, match="unknown hive 'ghost'"):
        registry.update_workers("ghost", [worker("a")])
    assert len(registry) == 0
    with pytest.raises(NotFoundError, match="unknown hive 'ghost'"):
        registry.get_hive("ghost")


def test_empty_workers_array(registry):
    registry.update_hive(heartbeat("hive-a", [worker("a")]))
    registry.update_hive(heartbeat("hive-a", []))
    assert registry.get_workers("hive-a") == []
    assert registry.hive_ids() == ["hive-a"]  # a hive with no workers is still a hive
    summary = registry.summary()
    assert (summary.hives_online, summary.workers_online) == (1, 0)


def test_multiple_hives_isolated(registry):
    registry.update_hive(heartbeat("hive-a", [worker("same", model="a-model")]))
    registry.update_hive(heartbeat("hive-b", [worker("same", model="b-model")]))
    registry.update_hive(heartbeat("hive-a", []))
    assert registry.get_workers("hive-a") == []
    assert [w.model for w in registry.get_workers("hive-b")] == ["b-model"]
    removed = registry.remove_hive("hive-b")
    assert removed is not None and removed.worker_ids == ["hive-b/llm/same"]
    assert registry.hive_ids() == ["hive-a"]


def test_remove_hive_removes_its_workers(registry):
    registry.update_hive(heartbeat("hive-a", [worker("a"), worker("b")]))
    event = registry.remove_hive("hive-a", "removed by request")
    assert event.reason == "removed by request"
    assert event.worker_ids == ["hive-a/llm/a", "hive-a/llm/b"]
    assert registry.get_all_workers() == []
    assert registry.remove_hive("hive-a") is None


# -- scheduling queries -------------------------------------------------------------------


def test_find_idle_workers_filters(registry):
    registry.update_hive(heartbeat("hive-a", [
        worker("idle", gpu_util_pct=0.0), worker("at-threshold", gpu_util_pct=5.0),
        worker("busy", gpu_util_pct=73.0),
        worker("exited", gpu_util_pct=0.0, state=WorkerState.EXITED)]))
    # listings are in worker id order (hive, group, instance), whatever order the hive sent
    assert ids(registry.find_idle_workers()) == ["hive-a/llm/at-threshold", "hive-a/llm/idle"]


def test_idle_follows_the_engine_when_it_is_known():
    queuing = worker("q", gpu_util_pct=0.0, engine=EngineState(
        engine="sglang", requests_running=0, requests_waiting=3))
    drained = worker("d", gpu_util_pct=99.0, engine=EngineState(
        engine="tgi", requests_running=0, requests_waiting=0))
    assert not is_idle(queuing, 5.0) and is_idle(drained, 5.0)
    assert not is_idle(worker("r", engine=EngineState(engine="vllm", requests_running=1,
                                                       requests_waiting=0)), 5.0)
    assert is_idle(worker("g", gpu_util_pct=5.0), 5.0) and not is_idle(worker("g", gpu_util_pct=5.1), 5.0)


def test_one_meaning_of_idle_in_listings_summary_and_stream(registry):
    """The listing's ``idle`` flag, the ``?idle`` filter, the summary's ``workers_available`` and
    the stream's ``idle`` list are one judgement: a worker with requests running and waiting is
    busy whatever its GPU shows, an exited or unknown-GPU worker is never idle, and a stale
    hive has none."""
    busy_engine = EngineState(engine="vllm", requests_running=8, requests_waiting=20)
    beat = heartbeat("hive-a", [
        worker("queued", gpu_util_pct=0.0, engine=busy_engine),
        worker("drained", gpu_util_pct=90.0, engine=EngineState(
            engine="vllm", requests_running=0, requests_waiting=0)),
        worker("quiet-gpu", gpu_util_pct=1.0),
        worker("no-gpu", gpu_util_pct=None),
        worker("exited", gpu_util_pct=0.0, state=WorkerState.EXITED)])
    registry.update_hive(beat)
    expected = ["hive-a/llm/drained", "hive-a/llm/quiet-gpu"]
    assert [w.id for w in registry.get_all_workers() if w.idle] == expected
    assert ids(registry.find_idle_workers()) == expected
    assert registry.summary().workers_available == 2
    assert ["hive-a/" + key for key in idle_instances(beat, registry.settings)] == expected
    assert ["hive-a/" + key for key in registry.get_hive("hive-a").idle] == expected
    registry.mark_stale("hive-a")
    assert not any(w.idle for w in registry.get_all_workers())
    assert registry.summary().workers_available == 0
    assert registry.get_hive("hive-a").idle == []


def test_summary_counts_engine_idle_workers_as_available(registry):
    registry.update_hive(heartbeat("a", [
        worker("drained", gpu_util_pct=80.0, engine=EngineState(
            engine="vllm", requests_running=0, requests_waiting=0)),
        worker("queuing", gpu_util_pct=0.0, engine=EngineState(
            engine="vllm", requests_running=2, requests_waiting=9))]))
    assert (registry.summary().workers_online, registry.summary().workers_available) == (2, 1)


def test_find_workers_with_model_matches(registry):
    registry.update_hive(heartbeat("hive-a", [worker("a", model="llama-3-8b"),
                                              worker("b", model="llama-3-8b-instruct"),
                                              worker("c", model=None)]))
    registry.update_hive(heartbeat("hive-b", [worker("d", model="llama-3-8b")]))
    assert ids(registry.find_workers_with_model("llama-3-8b")) == ["hive-a/llm/a", "hive-b/llm/d"]
    assert registry.find_workers_with_model("mistral") == []


def test_find_workers_with_capacity_checks_vram(registry):
    """Free VRAM comes from each hive's real devices (an 80 GiB and a 24 GiB card here), never
    from an assumed 24 GB; what workers claim is reported beside it, not mixed in."""
    registry.update_hive(heartbeat(
        "big", [worker("on-gpu0", gpu_indices=[0], vram_mb=30 * GIB),
                worker("also-gpu0", gpu_indices=[0], vram_mb=10 * GIB),
                worker("on-gpu1", gpu_indices=[1], vram_mb=20 * GIB),
                worker("no-gpu")],
        [gpu(0, total_gib=80, used_gib=42), gpu(1, total_gib=24, used_gib=21)]))

    found = registry.find_workers_with_capacity(30 * GIB)
    assert ids(found) == ["big/llm/also-gpu0", "big/llm/on-gpu0"]
    vram = found[1].vram
    assert vram.total_mb == 80 * GIB  # the device's total, not 24 GB
    assert vram.free_mb == 38 * GIB  # measured by the driver: includes non-rbee use
    assert vram.claimed_mb == 40 * GIB  # both rbee workers on GPU 0
    assert vram.measured is True

    assert ids(registry.find_workers_with_capacity(3 * GIB)) == [
        "big/llm/also-gpu0", "big/llm/on-gpu0", "big/llm/on-gpu1"]
    assert registry.find_workers_with_capacity(39 * GIB) == []


def test_find_workers_with_capacity_multi_gpu_worker_sums_its_gpus(registry):
    registry.update_hive(heartbeat(
        "hive-a", [worker("tp2", gpu_indices=[0, 1], vram_mb=60 * GIB)],
        [gpu(0, total_gib=80, used_gib=30), gpu(1, total_gib=80, used_gib=30)]))
    (found,) = registry.find_workers_with_capacity(100 * GIB)
    assert (found.vram.free_mb, found.vram.total_mb) == (100 * GIB, 160 * GIB)


def test_claimed_vram_comes_from_per_gpu_figures_not_an_equal_share(registry):
    """A worker holding 50 GiB on GPU 0 and 10 GiB on GPU 1 (its ``gpus`` breakdown) claims
    exactly that on each; a worker on GPU 1 alone sees 10 GiB of rbee's there, not 30."""
    tp2 = worker("tp2", gpu_indices=[0, 1], vram_mb=60 * GIB, gpus=[
        WorkerGpuUse(index=0, uuid="GPU-00000000", vram_mb=50 * GIB, util_pct=3.0),
        WorkerGpuUse(index=1, uuid="GPU-00000001", vram_mb=10 * GIB, util_pct=1.0)])
    solo = worker("solo", gpu_indices=[1], gpus=[
        WorkerGpuUse(index=1, uuid="GPU-00000001", vram_mb=0.0, util_pct=0.0)])
    registry.update_hive(heartbeat("hive-a", [tp2, solo], [
        gpu(0, total_gib=80, used_gib=50), gpu(1, total_gib=80, used_gib=10)]))
    found = {w.worker.instance: w for w in registry.get_all_workers()}
    assert found["solo"].vram.claimed_mb == 10 * GIB
    assert found["tp2"].vram.claimed_mb == 60 * GIB and found["tp2"].vram.free_mb == 100 * GIB


def test_unknown_gpu_utilisation_is_never_idle(registry):
    registry.update_hive(heartbeat("a", [worker("known", gpu_util_pct=0.0),
                                         worker("unknown", gpu_util_pct=None)]))
    assert ids(registry.find_idle_workers()) == ["a/llm/known"]


def test_workers_on_an_unhealthy_gpu_are_skipped_by_scheduling(registry):
    sick = msgspec.structs.replace(gpu(1, total_gib=80, used_gib=1), health=Unhealthy(
        reason="ecc_uncorrected: 2 uncorrected ECC errors since the driver loaded"))
    registry.update_hive(heartbeat("a", [
        worker("on-0", gpu_indices=[0], gpus=[WorkerGpuUse(index=0, uuid="GPU-00000000",
                                                            vram_mb=1.0, util_pct=0.0)]),
        worker("on-1", gpu_indices=[1], gpus=[WorkerGpuUse(index=1, uuid="GPU-00000001",
                                                            vram_mb=1.0, util_pct=0.0)]),
        worker("old-hive-on-1", gpu_indices=[1])],
        [gpu(0, total_gib=80, used_gib=1), sick]))
    assert ids(registry.find_idle_workers()) == ["a/llm/on-0"]
    listed = {w.worker.instance: w for w in registry.get_all_workers()}
    assert listed["on-1"].unhealthy_gpus == ["GPU-00000001"] and not listed["on-1"].schedulable
    assert listed["old-hive-on-1"].unhealthy_gpus == ["GPU-00000001"]
    registry.settings = msgspec.structs.replace(registry.settings, skip_unhealthy_gpus=False)
    assert len(registry.find_idle_workers()) == 3


def test_find_workers_with_capacity_without_device_list_uses_worker_total(registry):
    """A hive that sends no device list (an older hive): the worker's own GPU total less its use
    is the best estimate, and it is marked as not measured."""
    registry.update_hive(heartbeat("old", [worker("a", gpu_indices=[0], vram_mb=10 * GIB,
                                                  total_vram_mb=48 * GIB)]))
    (found,) = registry.find_workers_with_capacity(38 * GIB)
    assert found.vram.free_mb == 38 * GIB and found.vram.measured is False


def test_scheduling_on_empty_registry(registry):
    assert registry.find_idle_workers() == []
    assert registry.find_workers_with_model("llama-3-8b") == []
    assert registry.find_workers_with_capacity(1.0) == []
    assert registry.get_all_workers() == []
    summary = registry.summary()
    assert (summary.workers_online, summary.workers_available, summary.hives_online,
            summary.hives_available, summary.worker_ids, summary.hive_ids) == (0, 0, 0, 0, [], [])
    assert registry.snapshot().hives == []


def test_unschedulable_hives_are_listed_but_not_offered(registry):
    registry.update_hive(heartbeat("stopping", [worker("a")], status=OperationalStatus.STOPPING))
    registry.update_hive(heartbeat("sick", [worker("b")], health=Unhealthy(reason="disk")))
    registry.update_hive(heartbeat("degraded", [worker("c")],
                                   health=Degraded(reason="gpu: refresh slow")))
    assert ids(registry.find_idle_workers()) == ["degraded/llm/c"]
    assert len(registry.get_all_workers()) == 3
    summary = registry.summary()
    assert (summary.hives_online, summary.hives_available) == (3, 1)
    assert (summary.workers_online, summary.workers_available) == (3, 1)


def test_counts_online_and_available(registry, clock):
    registry.update_hive(heartbeat("a", [worker("idle"), worker("busy", gpu_util_pct=90.0)]))
    registry.update_hive(heartbeat("b", [worker("idle")]))
    clock.advance(2)
    registry.update_hive(heartbeat("b", [worker("idle")]))
    clock.advance(2)  # a: 4 s silent (stale); b: 2 s
    registry.sweep()
    summary = registry.summary()
    assert summary.hive_ids == ["b"] and summary.worker_ids == ["b/llm/idle"]
    assert (summary.hives_online, summary.hives_available) == (1, 1)
    assert (summary.workers_online, summary.workers_available) == (1, 1)


# -- concurrency --------------------------------------------------------------------------


def test_update_workers_thread_safe(registry):
    """Eight threads replace the same hive's workers 500 times each: every read sees one whole
    list a writer stored, never a mix, and the last write wins."""
    registry.update_hive(heartbeat("hive-a"))
    lists = {t: [worker(f"t{t}-{i}") for i in range(10)] for t in range(8)}
    torn: list[list[str]] = []

    def write(t: int) -> None:
        for _ in range(500):
            registry.update_workers("hive-a", lists[t])
            seen = [w.instance for w in registry.get_workers("hive-a")]
            if len({name.split("-")[0] for name in seen}) != 1 or len(seen) != 10:
                torn.append(seen)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torn == []
    assert len(registry.get_workers("hive-a")) == 10


async def test_concurrent_read_write(registry):
    """Trio tasks and threads at once: 4 hives written from threads, queries from trio tasks and
    threads; every query sees each hive's 20 workers whole."""
    errors: list[str] = []

    def writer(hive_id: str) -> None:
        for round_ in range(200):
            registry.update_hive(heartbeat(hive_id, [worker(f"{hive_id}-{round_}-{i}",
                                                            gpu_util_pct=0.0)
                                                     for i in range(20)]))

    def check() -> None:
        by_hive: dict[str, int] = {}
        for found in registry.find_idle_workers():
            by_hive[found.hive_id] = by_hive.get(found.hive_id, 0) + 1
        if any(count != 20 for count in by_hive.values()):
            errors.append(f"torn read: {by_hive}")

    async def trio_reader() -> None:
        for _ in range(200):
            check()
            registry.summary()
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for hive in ("a", "b", "c", "d"):
            nursery.start_soon(trio.to_thread.run_sync, writer, hive)
        nursery.start_soon(trio.to_thread.run_sync, lambda: [check() for _ in range(200)])
        nursery.start_soon(trio_reader)
    assert errors == []
    assert registry.summary().workers_online == 80


# -- stale cleanup ------------------------------------------------------------------------


def test_stale_hive_is_shown_but_not_scheduled(registry, clock):
    registry.update_hive(heartbeat("quiet", [worker("a")]))
    registry.update_hive(heartbeat("chatty", [worker("b")]))
    clock.advance(2.9)
    assert registry.sweep().stale == []
    registry.update_hive(heartbeat("chatty", [worker("b")]))
    clock.advance(0.2)
    result = registry.sweep()
    assert [e.hive_id for e in result.stale] == ["quiet"]
    assert result.stale[0].silent_s == pytest.approx(3.1)
    assert registry.sweep().stale == []  # announced once
    assert ids(registry.find_idle_workers()) == ["chatty/llm/b"]
    listed = {w.id: w.hive_stale for w in registry.get_all_workers()}
    assert listed == {"quiet/llm/a": True, "chatty/llm/b": False}
    assert registry.get_hive("quiet").stale is True


def test_heartbeat_revives_stale_hive(registry, clock):
    registry.update_hive(heartbeat("a", [worker("w")]))
    clock.advance(5)
    registry.sweep()
    registry.update_hive(heartbeat("a", [worker("w")]))
    assert registry.get_hive("a").stale is False
    assert ids(registry.find_idle_workers()) == ["a/llm/w"]


def test_silent_hive_is_removed_with_its_workers(registry, clock):
    registry.update_hive(heartbeat("gone", [worker("a"), worker("b")]))
    registry.update_hive(heartbeat("alive1"))
    registry.update_hive(heartbeat("alive2"))
    for _ in range(10):
        clock.advance(1)
        registry.update_hive(heartbeat("alive1"))
        registry.update_hive(heartbeat("alive2"))
        result = registry.sweep()
    assert [(e.hive_id, e.worker_ids) for e in result.removed] == [
        ("gone", ["gone/llm/a", "gone/llm/b"])]
    assert "no heartbeat for 10.0s" in result.removed[0].reason
    assert registry.hive_ids() == ["alive1", "alive2"]
    assert all(w.hive_id != "gone" for w in registry.get_all_workers())


def test_silence_is_judged_by_the_queen_clock_not_the_hive_timestamp(registry, clock):
    """A hive whose clock is an hour behind is fresh as long as its heartbeats arrive; one whose
    clock runs ahead is not kept alive by it."""
    late = heartbeat("behind")
    late.timestamp -= timedelta(hours=1)
    early = heartbeat("ahead")
    early.timestamp += timedelta(hours=1)
    registry.update_hive(late)
    registry.update_hive(early)
    registry.update_hive(heartbeat("third"))
    registry.sweep()
    assert [h.stale for h in registry.hives()] == [False, False, False]
    for _ in range(10):
        clock.advance(1)
        registry.update_hive(late)
        registry.update_hive(heartbeat("third"))
        result = registry.sweep()
    assert [e.hive_id for e in result.removed] == ["ahead"]
    assert registry.get_hive("behind").last_heartbeat == late.timestamp


def test_mass_silence_removes_nothing(registry, clock):
    """When most hives fall silent together the queen suspects its own side and keeps them (as
    stale) until they come back; a lone silent hive is still removed afterwards."""
    for _ in range(6):  # reporting for established_after_s: established hives
        for hive in ("a", "b", "c", "d"):
            registry.update_hive(heartbeat(hive, [worker("w")]))
        registry.sweep()
        clock.advance(1)
    clock.advance(-1)
    for _ in range(30):  # the queen sweeps every second; all four stay silent past 10 s
        clock.advance(1)
        result = registry.sweep()
        assert result.removed == []
    assert result.held == ["a", "b", "c", "d"]
    assert [h.stale for h in registry.hives()] == [True] * 4
    assert registry.find_idle_workers() == []
    for hive in ("a", "b", "c"):  # three come back; d stays silent
        registry.update_hive(heartbeat(hive, [worker("w")]))
    result = registry.sweep()
    assert [e.hive_id for e in result.removed] == ["d"]


def test_queen_stall_restarts_silence_count(registry, clock):
    """If the queen itself did not run (suspended, loop stalled) for longer than stale_after_s,
    hives were not silent: it was not listening. Nothing is removed for that gap."""
    registry.update_hive(heartbeat("a"))
    registry.sweep()
    clock.advance(60)  # the queen was stopped for a minute
    result = registry.sweep()
    assert (result.stale, result.removed) == ([], [])
    assert registry.get_hive("a").stale is False
    for _ in range(11):  # but if the hive stays silent from here on, it goes
        clock.advance(1)
        result = registry.sweep()
        if result.removed:
            break
    assert [e.hive_id for e in result.removed] == ["a"]


def test_a_burst_of_fake_ids_cannot_hold_off_removal(clock):
    """2,000 ids posted once (as an attacker would) outnumber the real fleet, but they never
    reported for ``established_after_s``: the mass-silence guard ignores them, they are removed
    at ``remove_after_s``, and a real hive that then goes silent is removed too."""
    registry = HiveRegistry(RegistrySettings(stale_after_s=3, remove_after_s=10,
                                             established_after_s=5, max_hives=5000,
                                             new_hives_burst=5000), clock=clock)
    real = ("gpu-01", "gpu-02", "gpu-03", "gpu-04")
    for _ in range(6):
        for hive in real:
            registry.update_hive(heartbeat(hive, [worker("w")]))
        registry.sweep()
        clock.advance(1)
    for n in range(2000):
        registry.update_hive(heartbeat(f"fake-{n:05}"))
    removed: list[str] = []
    for _ in range(30):  # gpu-04 goes silent with the fakes; the others keep reporting
        clock.advance(1)
        for hive in real[:3]:
            registry.update_hive(heartbeat(hive, [worker("w")]))
        result = registry.sweep()
        assert result.held == []
        removed += [e.hive_id for e in result.removed]
    assert sorted(removed) == sorted([*(f"fake-{n:05}" for n in range(2000)), "gpu-04"])
    assert registry.hive_ids() == ["gpu-01", "gpu-02", "gpu-03"]


def test_the_guard_holds_established_hives_only(registry, clock):
    """During a mass silence the established hives are held; one that joined a moment before
    (not established yet) is removed on time, and does not count towards the guard."""
    for _ in range(6):
        for hive in ("a", "b", "c"):
            registry.update_hive(heartbeat(hive))
        registry.sweep()
        clock.advance(1)
    registry.update_hive(heartbeat("newcomer"))
    held, removed = [], []
    for _ in range(15):
        clock.advance(1)
        result = registry.sweep()
        held, removed = result.held or held, removed + [e.hive_id for e in result.removed]
    assert (held, removed) == (["a", "b", "c"], ["newcomer"])


def test_the_registry_holds_at_most_max_hives(clock):
    registry = HiveRegistry(RegistrySettings(max_hives=3), clock=clock)
    for hive in ("a", "b", "c"):
        registry.update_hive(heartbeat(hive))
    with pytest.raises(AdmissionError, match=r"registry is full \(registry.max_hives: 3\)") as exc:
        registry.update_hive(heartbeat("d"))
    assert exc.value.retry_after_s is None and exc.value.hive_id == "d"
    registry.update_hive(heartbeat("c"))  # a known hive is never refused
    registry.remove_hive("a")
    registry.update_hive(heartbeat("d"))
    assert registry.hive_ids() == ["b", "c", "d"]


def test_new_hives_are_admitted_at_a_bounded_rate(clock):
    registry = HiveRegistry(RegistrySettings(new_hives_per_s=2, new_hives_burst=3), clock=clock)
    for hive in ("a", "b", "c"):
        registry.update_hive(heartbeat(hive))
    with pytest.raises(AdmissionError, match=r"at most 2/s \(registry.new_hives_per_s") as exc:
        registry.update_hive(heartbeat("d"))
    assert exc.value.retry_after_s == pytest.approx(0.5)
    for _ in range(5):
        registry.update_hive(heartbeat("a"))  # known hives pass whatever the rate
    clock.advance(0.5)
    registry.update_hive(heartbeat("d"))
    with pytest.raises(AdmissionError):
        registry.update_hive(heartbeat("e"))
    assert registry.hive_ids() == ["a", "b", "c", "d"]


def test_worker_pages_follow_the_cursor(registry):
    """Pages in worker id order, resumed after the cursor, filters applied on the way; the
    concatenated pages are the whole listing."""
    for hive in ("h3", "h1", "h2"):
        registry.update_hive(heartbeat(hive, [worker(f"w{k}", gpu_util_pct=k * 10.0)
                                              for k in (2, 0, 1)]))
    every = ids(registry.get_all_workers())
    assert every == [f"h{h}/llm/w{k}" for h in (1, 2, 3) for k in (0, 1, 2)]
    pages, after = [], None
    while True:
        page = registry.workers_page(after=after, limit=4)
        pages.append(ids(page.workers))
        if page.next_after is None:
            break
        after = page.next_after
    assert pages == [every[:4], every[4:8], every[8:]]
    idle = WorkerQuery(idle=True)
    first = registry.workers_page(idle, limit=2)
    assert (ids(first.workers), first.next_after) == (["h1/llm/w0", "h2/llm/w0"], "h2/llm/w0")
    rest = registry.workers_page(idle, after=first.next_after, limit=2)
    assert (ids(rest.workers), rest.next_after) == (["h3/llm/w0"], None)
    registry.remove_hive("h2")  # the cursor's hive gone: the next page starts after it
    assert ids(registry.workers_page(after="h2/llm/w0", limit=9).workers)[0] == "h3/llm/w0"
    with pytest.raises(ValueError, match="'h2/w0' is not a worker id"):
        registry.workers_page(after="h2/w0")
