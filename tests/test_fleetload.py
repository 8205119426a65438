"""The fleet benchmark's load generator (tests/fleetload.py) against a real queen on 127.0.0.1,
as bench/test_bench_fleet.py drives it (a process of its own, steps on stdin, one JSON line per
window): every hive connects, beats once a second, and each beat of the window is answered 200,
over POST and over the channel. The benches trust its figures; this keeps them honest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .queenkit import start_queen

REPO = Path(__file__).parents[1]
HIVES = 40
WINDOW_S = 2.0
"""Whole periods: each hive sends two beats in it, give or take its jitter at the edges."""


@pytest.mark.parametrize("transport", ["post", "channel"])
async def test_every_hive_beats_and_every_beat_of_the_window_is_answered(nursery, transport):
    queen = await start_queen(nursery)
    port = queen.urls[0].rsplit(":", 1)[1]
    load = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.fleetload", port, "--warmup-s", "0.5", "--window-s",
         str(WINDOW_S), *(["--channel"] if transport == "channel" else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
    try:
        await load.stdin.send_all(b"%d\n" % HIVES)
        lines: list[bytes] = []
        buffer = b""
        with trio.fail_after(30):
            while len(lines) < 3:
                chunk = await load.stdout.receive_some()
                assert chunk, (buffer, lines)
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines += complete
        assert lines[:2] == [b"start", b"end"]
        window = json.loads(lines[2])
        await load.stdin.aclose()
        with trio.fail_after(10):
            assert await load.wait() == 0
    finally:
        if load.returncode is None:
            load.kill()
            await load.wait()
    due = HIVES * WINDOW_S
    assert window["hives"] == HIVES and window["expected"] == due
    assert 0.9 * due <= window["sent"] <= 1.1 * due, window
    assert window["answered"] == window["ok"] == window["sent"], window
    assert window["statuses"] == {"200": window["ok"]}, window
    assert window["resets"] == window["timeouts"] == window["unanswered"] == 0, window
    assert 0 < window["p50_ms"] <= window["p99_ms"] < 5000, window  # a loaded CI machine too
    assert len(queen.registry.hive_ids()) == HIVES
