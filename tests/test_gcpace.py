"""The queen's garbage-collection pacing (``rbee/queen/gcpace.py``), on this process's own
collector: what exists is frozen each ``freeze_every_s``, so a collection no longer walks it;
garbage cycles wait for the full collection every ``full_every_s``, which finds them; leaving
unfreezes everything. The schedule runs under trio's MockClock. Python's automatic collection is
switched off for each test, so that only the pacer's and the test's own collections happen."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from rbee import ConfigError
from rbee.config import QueenConfig, parse_config
from rbee.queen.gcpace import GcGauges, GcPacer
from rbee.settings import GcSettings


@pytest.fixture(autouse=True)
def no_automatic_collection():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    """Two objects that reference each other and nothing else: garbage only a cyclic collection
    frees. Returns a weak reference to one of them."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def test_cycles_frozen_wait_for_the_full_collection(nursery, mock_clock):
    pacer = GcPacer(GcSettings(freeze_every_s=0.1, full_every_s=5))
    nursery.start_soon(pacer.run)
    await trio.sleep(0.05)
    garbage = cycle()
    await trio.sleep(0.1)  # a tick: the cycle is frozen
    assert gc.get_freeze_count() > 0
    gc.collect()  # every generation: the frozen objects are not walked
    assert garbage() is not None
    assert pacer.full_collections == 0
    await trio.sleep(5)
    assert garbage() is None
    assert pacer.full_collections == 1
    assert pacer.last is not None and pacer.last.unreachable >= 2
    assert pacer.last.objects > 0


async def test_a_cycle_not_frozen_yet_is_collected_as_before(nursery, mock_clock):
    pacer = GcPacer(GcSettings(freeze_every_s=0.1, full_every_s=5))
    nursery.start_soon(pacer.run)
    await trio.sleep(0.15)
    garbage = cycle()  # made after a tick: young until the next
    gc.collect(0)
    assert garbage() is None


async def test_full_collections_come_every_full_every_s(nursery, mock_clock):
    pacer = GcPacer(GcSettings(freeze_every_s=0.5, full_every_s=10))
    nursery.start_soon(pacer.run)
    await trio.sleep(9.9)
    assert pacer.full_collections == 0
    await trio.sleep(0.2)
    assert pacer.full_collections == 1
    await trio.sleep(10)
    assert pacer.full_collections == 2


async def test_leaving_unfreezes_everything(mock_clock):
    pacer = GcPacer(GcSettings(freeze_every_s=0.1, full_every_s=5))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pacer.run)
        await trio.sleep(0.25)
        assert gc.get_freeze_count() > 0
        nursery.cancel_scope.cancel()
    assert gc.get_freeze_count() == 0


async def test_zero_leaves_the_collector_alone(mock_clock):
    pacer = GcPacer(GcSettings(freeze_every_s=0))
    with trio.move_on_after(1) as waited:
        await pacer.run()
    assert not waited.cancelled_caught  # it returned at once
    assert gc.get_freeze_count() == 0


def test_metrics_show_the_full_collections():
    pacer = GcPacer(GcSettings())
    registry = CollectorRegistry()
    registry.register(GcGauges(pacer))
    assert "rbee_queen_gc_full_collections_total 0.0" in generate_latest(registry).decode()
    pacer.collect_fully()
    text = generate_latest(registry).decode()
    assert "rbee_queen_gc_full_collections_total 1.0" in text
    seconds = next(line for line in text.splitlines()
                   if line.startswith("rbee_queen_gc_last_full_seconds "))
    assert float(seconds.split()[1]) == pacer.last.seconds > 0


def test_the_queen_config_takes_gc_and_names_a_bad_value():
    config = parse_config({"gc": {"freeze_every_s": 0.2, "full_every_s": 60}}, QueenConfig)
    assert (config.gc.freeze_every_s, config.gc.full_every_s) == (0.2, 60)
    assert QueenConfig().gc == GcSettings(freeze_every_s=0.1, full_every_s=600)
    with pytest.raises(ConfigError, match=r"gc\.full_every_s"):
        parse_config({"gc": {"full_every_s": 0}}, QueenConfig)
