"""The pick index places the hives changed since the last pick in parts (``PickIndex.refresh``):
other tasks run between the parts, and the pick that follows still answers from the registry as
it is when it answers, changes made between the parts included."""

from __future__ import annotations

import trio

from rbee.queen.pick import index as index_module
from rbee.queen.scheduling import WorkerQuery

from .builders import heartbeat
from .test_pick_index import MODEL, Clocks, make, serving


async def test_a_pick_after_many_changes_yields_between_parts(monkeypatch):
    monkeypatch.setattr(index_module, "PLACE_PER_PART", 4)
    clocks = Clocks()
    registry, index = make(clocks)
    for n in range(40):
        registry.update_hive(heartbeat(f"h{n:02d}", [serving("w1", waiting=5 + n)]))
    steps, changed = 0, False

    async def other_task() -> None:
        nonlocal steps, changed
        while True:
            steps += 1
            if steps == 3:  # between two parts: a hive now has the emptiest queue
                registry.update_hive(heartbeat("h39", [serving("w1", waiting=0)]))
                changed = True
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        await index.refresh()
        answer = index.pick(MODEL)
        nursery.cancel_scope.cancel()
    assert steps >= 9  # 40 hives at four a part: the other task ran between the parts
    assert changed and answer.picked[0].hive_id == "h39"
    assert answer.candidates == 40


async def test_vram_figures_are_filled_in_parts_too(monkeypatch):
    monkeypatch.setattr(index_module, "PLACE_PER_PART", 4)
    clocks = Clocks()
    registry, index = make(clocks)
    for n in range(20):
        registry.update_hive(heartbeat(f"h{n:02d}", [serving(
            "w1", waiting=n, total_vram_mb=80 * 1024, vram_mb=1024 * n)]))
    await index.refresh(vram=True)
    assert len(index._vram_due) <= 4
    answer = index.pick(WorkerQuery(model="m", min_free_vram_mb=79 * 1024 - 1), n=5)
    assert [w.hive_id for w in answer.picked] == ["h00", "h01"]
