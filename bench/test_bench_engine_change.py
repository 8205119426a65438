"""Engine change -> queen, and -> a filtered stream client (issue 25: p99 <= 100 ms and
<= 150 ms, with 8 and 100 engines per hive), through real processes:

- the engines: stand-in vLLMs in a process of their own (``bench/engineserver.py``);
- a real ``rbee-queen`` and a real ``rbee-hive`` (its workers in real cgroups, each naming one
  engine by ``metrics_url``), over the channel or over POST;
- two observers in this process, each on its own connection: the queen's view (the unfiltered
  stream, ``hive_telemetry`` per heartbeat) and a router's (``?model=M&events=worker_update``).

The engines' load flips at known times, one engine at a time, a new queue length each flip,
every 50-102 ms (no engine twice within a poll interval). A latency is the first time an
observer's socket delivers an event with the new figure, minus the time the engine process
changed it (both wall clock, one machine). Each seen figure also carries the hive's
``sampled_at`` (when its poll read it) and the heartbeat's ``timestamp`` (when it was
published), so each change is split into where it waited: -> read (the poll), -> published (the
hive's publisher), -> seen (channel or POST, the queen's ingest and fan-out). Hive CPU over the
flips is read from /proc.

    ./dev test -n 0 bench/test_bench_engine_change.py

``RBEE_BENCH_CHANGES`` (default 250) sets the flips per case.
"""

from __future__ import annotations

import os
import statistics
import time
import urllib.parse
from datetime import datetime

import msgspec
import pytest
import trio
import yaml

from tests.daemons import Daemon

from .conftest import FIGURES
from .engineserver import Engines, proc_cpu_s

FLAG = "--enable-server-load-tracking"
MODEL = "bench-model"
CHANGES = int(os.environ.get("RBEE_BENCH_CHANGES", "250"))
CGROUP_ROOT = "rbee-bench-engine-change"


class Observer:
    """One stream connection; the first time each (instance, waiting) figure was delivered,
    with the ``sampled_at`` and heartbeat ``timestamp`` it came with."""

    def __init__(self, name: str, target: str) -> None:
        self.name, self.target = name, target
        self.seen: dict[tuple[str, int], tuple[float, float, float]] = {}
        self.engines: set[str] = set()
        self.events = 0

    async def run(self, host: str, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(f"GET {self.target} HTTP/1.1\r\nHost: q\r\n\r\n".encode())
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            task_status.started()
            while True:
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    self._take(frame)
                data = await stream.receive_some(1 << 20)
                if not data:
                    return
                buffer = (buffer + data).replace(b"\r\n", b"\n")  # lines end in CRLF

    def _take(self, frame: bytes) -> None:
        for line in frame.split(b"\n"):
            if line.startswith(b"data:") and b"requests_waiting" in line:
                event = msgspec.json.decode(line[5:])
                self.events += 1
                kind = event["type"]
                if kind == "hive_telemetry":
                    for worker in event["workers"]:
                        self._worker(worker["instance"], worker.get("engine"),
                                     event["timestamp"])
                elif kind == "snapshot":  # who is there: no figure is new in it
                    self.engines.update(w["instance"] for hive in event["hives"]
                                        for w in hive["workers"] if w.get("engine"))
                elif kind == "worker_update":
                    self._worker(event["instance"], event["fields"].get("engine"),
                                 event["timestamp"])

    def _worker(self, instance: str, engine: dict | None, timestamp: str) -> None:
        if engine is None:
            return
        self.engines.add(instance)
        key = (instance, engine["requests_waiting"])
        if key not in self.seen and engine.get("sampled_at"):
            self.seen[key] = (time.time(), wall(engine["sampled_at"]), wall(timestamp))


def wall(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1e3:.1f} ms, p99 "
            f"{percentile(values, 0.99) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms")


def hive_yaml(engines: Engines, transport: str, queen_url: str) -> str:
    argv = ["sh", "-c", "exec sleep 600", "--model", MODEL, FLAG]
    return yaml.safe_dump({
        "id": "bench-engine-hive", "port": 0, "queen_url": queen_url,
        "stop_workers_on_exit": True, "cgroup": {"root": CGROUP_ROOT},
        "collect": {"gpu": "none"}, "heartbeat": {"transport": transport},
        "workers": [{"group": "llm", "instance": f"e{index:03}", "argv": argv, "metrics_url": url}
                    for index, url in enumerate(engines.urls)]})


async def flip_and_observe(engines: Engines, count: int, queen_url: str, hive_pid: int
                           ) -> tuple[list[tuple[str, int, float, float]], list[Observer], float]:
    """Flip the engines' loads; returns each flip (instance, waiting, perf time, wall time),
    the observers, and the hive's CPU % of a core over the flips."""
    host, port = queen_url.removeprefix("http://").rsplit(":", 1)
    path = "/v1/heartbeats/stream"
    observers = [Observer("queen stream", path),
                 Observer("filtered client", f"{path}?model={urllib.parse.quote(MODEL, safe='')}"
                          "&events=worker_update")]
    flips = []
    async with trio.open_nursery() as nursery:
        for observer in observers:
            await nursery.start(observer.run, host, int(port))
        deadline = trio.current_time() + 60
        while any(len(o.engines) < count for o in observers):
            assert trio.current_time() < deadline, [(o.name, o.events, len(o.engines))
                                                    for o in observers]
            await trio.sleep(0.1)
        await trio.sleep(1.5)  # every engine's fast poll running
        cpu, started = proc_cpu_s(hive_pid), time.perf_counter()
        for change in range(CHANGES):
            index = change * 7 % count
            waiting = 100 + change
            engines.set_load(index, 12 + waiting)
            flips.append((f"e{index:03}", waiting, time.perf_counter(), time.time()))
            await trio.sleep(0.05 + (change % 5) * 0.013)
        hive_pct = 100 * (proc_cpu_s(hive_pid) - cpu) / (time.perf_counter() - started)
        with trio.move_on_after(5):
            while any(flip[:2] not in o.seen for o in observers for flip in flips):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return flips, observers, hive_pct


@pytest.mark.parametrize("transport", ["channel", "post"])
@pytest.mark.parametrize("count", [8, 100])
def test_engine_change_to_queen_and_filtered_client(count, transport, tmp_path):
    with Engines(count, tmp_path) as engines, \
            Daemon("rbee-queen", tmp_path / "queen.yaml", "port: 0\n") as queen, \
            Daemon("rbee-hive", tmp_path / "hive.yaml", hive_yaml(engines, transport, queen.url),
                   cgroup_root=CGROUP_ROOT) as hive:
        flips, observers, hive_pct = trio.run(flip_and_observe, engines, count, queen.url,
                                              hive.process.pid)
    changed = {(f"e{index:03}", load - 12): at for index, load, at in engines.applied}
    FIGURES[f"engine change, {count} engines, {transport}: hive CPU over the flips"] = \
        f"{hive_pct:.2f} % of a core (load average {os.getloadavg()[0]:.2f})"
    row = [f"| {count}, {transport} "]
    for observer in observers:
        stages = []  # (seen, read, published), seconds after the engine changed
        for instance, waiting, _, _ in flips:
            seen = observer.seen.get((instance, waiting))
            if seen is not None:
                at = changed[instance, waiting]
                stages.append((seen[0] - at, seen[1] - at, seen[2] - at))
        missed = len(flips) - len(stages)
        latencies = [seen for seen, _, _ in stages]

        def ms(stage: tuple[float, float, float]) -> str:
            return "/".join(f"{part * 1e3:.0f}" for part in (stage[1], stage[2], stage[0]))

        middle = tuple(statistics.median(part) for part in zip(*stages, strict=True))
        FIGURES[f"engine change -> {observer.name}, {count} engines, {transport}"] = (
            f"{summary(latencies)} ({len(latencies)} changes, {missed} missed); read / "
            f"published / seen, ms after the engine changed: p50 {ms(middle)}, slowest "
            + ", ".join(ms(stage) for stage in sorted(stages, reverse=True)[:3]))
        row.append("| " + " / ".join(f"{value * 1e3:.1f}" for value in (
            statistics.median(latencies), percentile(latencies, 0.99), max(latencies))) + " ms ")
        if observer is observers[0]:
            middle_ms = ms(middle)
        assert missed == 0, f"{observer.name} never saw {missed} of {len(flips)} changes"
    FIGURES[f"engine change, {count} engines, {transport}: docs/engines.md row"] = "".join(row) + (
        f"| {middle_ms} ms | {hive_pct:.1f} % | {os.getloadavg()[0]:.1f} |")
