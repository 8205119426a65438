"""Who holds the queen's event loop, and for how long: one real queen in this process with N
eight-GPU hives, measured by a trio ``Instrument``.

    python bench/loopholds.py N [--window-s 10] [--warmup-s 4] [--stream] [--metrics]
                                [--tracemalloc]

A real ``QueenServer`` (memory store, port 0 on 127.0.0.1) runs its own periodic tasks: the
store's silence sweep (``registry.cleanup_interval_s``) and fleet summary
(``stream.queen_interval_s``), history's step (``history.fine_step_s``), and HTTP serving (idle).
Beside it, in the same loop, drivers do what a fleet and its readers do:

- ``ingest``: every hive's heartbeat once a second, spread evenly (a tick every 10 ms, ten
  heartbeats between checkpoints), through the store's own ``ingest`` (the registry, the
  stream's event, the pick's and history's notes); each heartbeat is the hive's decoded
  eight-GPU, eight-worker struct with new lists, as a fresh decode would give (the bytes' decode
  is the transport's, measured by bench/test_bench_fleet.py, and left out here);
- ``pick``: a ``/v1/pick`` of one model every 100 ms, through the raw GET handler;
- with ``--metrics``: a ``/metrics`` written every 5 s, on the loop in parts as the route
  does (``rbee.exposition.fleet_parts``; its wall time is reported, each part is a task step);
- ``probe``: sleeps 1 ms again and again and records how late it wakes: what a heartbeat that
  became ready would wait for the loop;
- with ``--stream``: one SSE client of the whole stream (connects once the fleet is in, so the
  window holds its snapshot only if it reconnects).

For every task the window reports the longest single step (``before_task_step`` to
``after_task_step``) in the loop thread's CPU time (``time.thread_time``: on a machine shared
with other work, wall time also counts the moments the OS ran something else) and in wall time,
its total CPU time (its share of the window's wall time) and its steps; and
Python's cyclic collections by generation (``gc.callbacks``), with their longest pause. One line
of JSON on stdout. It imports ``rbee`` from ``PYTHONPATH``, so the same script measures another
checkout (bench/test_bench_loop_holds.py does, with ``RBEE_BENCH_BEFORE``).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
import tracemalloc
from collections import defaultdict
from types import SimpleNamespace

import msgspec
import psutil
import trio

from rbee.config import QueenConfig
from rbee.queen import main as queen_main
from rbee.queen.server import QueenServer
from rbee.scrape import exposition
from tests.fleetload import eight_gpu_hive

TICK_S = 0.01
PER_CHECKPOINT = 10
PICK_EVERY_S = 0.1
METRICS_EVERY_S = 5.0
PROBE_S = 0.001


def short(name: str) -> str:
    """A task's name without its package: ``MemoryStore._summary_loop``."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else name


class Holds(trio.abc.Instrument):
    """Each task's longest step, total and count; the cyclic collector's pauses by generation."""

    def __init__(self) -> None:
        self._step = self._wall = self._gc_started = 0.0
        self.reset()
        gc.callbacks.append(self._gc)

    def reset(self) -> None:
        self.longest: dict[str, float] = defaultdict(float)
        self.longest_wall: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self.gc_longest: dict[int, float] = defaultdict(float)
        self.gc_total: dict[int, float] = defaultdict(float)
        self.gc_count: dict[int, int] = defaultdict(int)
        self.began = time.perf_counter()

    def before_task_step(self, task) -> None:
        self._step = time.thread_time()
        self._wall = time.perf_counter()

    def after_task_step(self, task) -> None:
        took = time.thread_time() - self._step
        name = short(task.name)
        self.total[name] += took
        self.steps[name] += 1
        if took > self.longest[name]:
            self.longest[name] = took
        self.longest_wall[name] = max(self.longest_wall[name], time.perf_counter() - self._wall)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        generation = info["generation"]
        self.gc_total[generation] += took
        self.gc_count[generation] += 1
        self.gc_longest[generation] = max(self.gc_longest[generation], took)

    def report(self) -> dict:
        wall = time.perf_counter() - self.began
        tasks = {name: {"longest_ms": round(self.longest[name] * 1e3, 2),
                        "longest_wall_ms": round(self.longest_wall[name] * 1e3, 2),
                        "share_pct": round(self.total[name] / wall * 100, 2),
                        "steps": self.steps[name]}
                 for name in sorted(self.total, key=lambda n: -self.longest[n])}
        collections = {str(g): {"count": self.gc_count[g],
                                "longest_ms": round(self.gc_longest[g] * 1e3, 2),
                                "total_ms": round(self.gc_total[g] * 1e3, 1)}
                       for g in sorted(self.gc_count)}
        return {"wall_s": round(wall, 2), "tasks": tasks, "gc": collections}


def heartbeats(hives: int) -> list:
    """Each hive's eight-GPU heartbeat, its workers given endpoints (so they can be picked)."""
    out = []
    for n in range(hives):
        heartbeat = eight_gpu_hive(f"hive-{n:05d}", n)
        heartbeat.workers = [msgspec.structs.replace(w, endpoint=f"http://10.{n // 250}.{n % 250}"
                                                     f".1:{8000 + i}")
                             for i, w in enumerate(heartbeat.workers)]
        out.append(heartbeat)
    return out


def fresh(heartbeat):
    """The heartbeat as a new decode gives it: its own lists (the registry and history tell a
    new heartbeat by its lists)."""
    return msgspec.structs.replace(heartbeat, workers=list(heartbeat.workers),
                                   capabilities=list(heartbeat.capabilities))


async def ingest(queen: QueenServer, beats: list, stop: trio.Event) -> None:
    """Every hive once a second, spread over ``TICK_S`` ticks."""
    store = queen.fleet.store
    per_tick = max(1, round(len(beats) * TICK_S))
    next_at, at = trio.current_time(), 0
    while not stop.is_set():
        for start in range(0, per_tick, PER_CHECKPOINT):
            for _ in range(min(PER_CHECKPOINT, per_tick - start)):
                await store.ingest(fresh(beats[at]))
                at = (at + 1) % len(beats)
            await trio.lowlevel.checkpoint()
        next_at += TICK_S
        await trio.sleep_until(next_at)


async def picks(queen: QueenServer, model: str, stop: trio.Event) -> dict:
    handler = queen.app.state.raw_gets["/v1/pick"]
    head = SimpleNamespace(query=f"model={model}")
    while not stop.is_set():
        await handler.answer(head, None, b"")
        await trio.sleep(PICK_EVERY_S)


async def probe(lateness: list[float], stop: trio.Event) -> None:
    while not stop.is_set():
        due = trio.current_time() + PROBE_S
        await trio.sleep_until(due)
        lateness.append(trio.current_time() - due)


async def metrics(queen: QueenServer, renders: list[float], stop: trio.Event) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        parts, _ = exposition(queen.metrics.registry, None, queen.metrics.records)
        for _part in parts:
            await trio.lowlevel.checkpoint()
        renders.append(time.perf_counter() - began)
        await trio.sleep(METRICS_EVERY_S)


async def stream_client(queen: QueenServer, stop: trio.Event) -> None:
    async for _ in queen.fleet.stream():
        if stop.is_set():
            return


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def measure(args: argparse.Namespace, holds: Holds) -> dict:
    hives = args.hives
    config = msgspec.convert({
        "bind": "127.0.0.1", "port": 0,
        "registry": {"max_hives": hives * 2, "new_hives_per_s": 1e6, "new_hives_burst": hives * 2},
    }, QueenConfig)
    settle = getattr(queen_main, "settle_gc", None)  # as rbee-queen starts, where it does
    if settle is not None:  # with the daemon's thresholds where the tree passes them
        settle(*([queen_main.GC_THRESHOLDS] if inspect.signature(settle).parameters else []))
    if os.environ.get("RBEE_BENCH_GC_THRESHOLDS"):
        gc.set_threshold(*map(int, os.environ["RBEE_BENCH_GC_THRESHOLDS"].split(",")))
    beats = heartbeats(hives)  # the registry's heartbeats share their inner lists and structs
    rss_before = psutil.Process().memory_info().rss
    queen = QueenServer(config)
    figures: dict = {"hives": hives}
    async with trio.open_nursery() as nursery:
        await nursery.start(queen.run)
        for heartbeat in beats:
            await queen.fleet.store.ingest(fresh(heartbeat))
        stop = trio.Event()
        lateness: list[float] = []
        renders: list[float] = []
        nursery.start_soon(ingest, queen, beats, stop)
        nursery.start_soon(picks, queen, beats[0].workers[0].model, stop)
        if args.metrics:
            nursery.start_soon(metrics, queen, renders, stop)
        nursery.start_soon(probe, lateness, stop)
        if args.stream:
            nursery.start_soon(stream_client, queen, stop)
        await trio.sleep(args.warmup_s)
        if args.tracemalloc:
            tracemalloc.start(1)
        lateness.clear()
        renders.clear()
        cpu = time.process_time()
        holds.reset()
        await trio.sleep(args.window_s)
        figures.update(holds.report())
        figures["cpu_pct"] = round((time.process_time() - cpu) / figures["wall_s"] * 100, 1)
        figures["probe_ms"] = {"p50": round(percentile(lateness, 0.5) * 1e3, 2),
                               "p99": round(percentile(lateness, 0.99) * 1e3, 2),
                               "max": round(max(lateness, default=0) * 1e3, 2)}
        figures["metrics_render_ms"] = round(max(renders, default=0) * 1e3, 1)
        began = time.thread_time()
        gc.collect()
        figures["gc_full_ms"] = round((time.thread_time() - began) * 1e3, 1)
        figures["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        figures["rss_kb_per_hive"] = round(
            (psutil.Process().memory_info().rss - rss_before) / 1024 / hives, 1)
        figures["tracked_objects_per_hive"] = round(len(gc.get_objects()) / hives, 1)
        if args.tracemalloc:
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            figures["top_allocations"] = [
                f"{stat.traceback[0].filename.rsplit('/', 2)[-1]}:{stat.traceback[0].lineno} "
                f"{stat.size / hives:.0f} B/hive" for stat in snapshot.statistics("lineno")[:12]]
        stop.set()
        queen.stop()
        nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hives", type=int)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--metrics", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    thresholds = os.environ.get("RBEE_BENCH_GC_THRESHOLDS")  # e.g. 10000,10,1000: to compare
    gc.set_threshold(*(map(int, thresholds.split(",")) if thresholds
                       else queen_main.GC_THRESHOLDS))
    holds = Holds()
    figures = trio.run(measure, args, holds, instruments=[holds])
    figures["source"] = os.path.dirname(os.path.dirname(queen_main.__file__))
    print(json.dumps(figures), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
