"""The long fuzz run: ``RBEE_FUZZ_BENCH_CASES`` (20,000) random mutation cases against a real
``rbee-queen`` and ``rbee-hive``, the same fuzzer as ``tests/test_fuzz.py`` but not derandomized,
so every run explores new cases. Target: zero 5xx, zero unanswered. Reported: the answers by
status class, the rate, the queen's resident memory before, after and at its peak."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from rbee.contract import encode
from tests.builders import fleet_heartbeat
from tests.fuzzkit import rss_mib
from tests.test_fuzz import fuzz, fuzz_daemons

from .conftest import FIGURES

CASES = int(os.environ.get("RBEE_FUZZ_BENCH_CASES", "20000"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for pid {pid}")


def test_fuzz_long_run(benchmark, tmp_path):
    queen, hive = fuzz_daemons(tmp_path)
    try:
        anchor = fleet_heartbeat("fuzz-anchor", 20)
        assert httpx.post(f"{queen.url}/v1/hive-heartbeat", content=encode(anchor)).is_success
        before = rss_mib(queen.process.pid)
        outcome: dict = {}

        def run() -> None:
            started = time.perf_counter()
            outcome["counts"], outcome["findings"] = fuzz(queen.url, hive.url, CASES,
                                                          derandomize=False)
            outcome["seconds"] = time.perf_counter() - started

        benchmark.pedantic(run, rounds=1, iterations=1)
        counts, findings = outcome["counts"], outcome["findings"]
        answered = sum(n for key, n in counts.items() if key != "unanswered")
        FIGURES["fuzz, queen and hive over HTTP"] = (
            f"{sum(counts.values()):,} cases in {outcome['seconds']:.0f} s: "
            f"{', '.join(f'{k} {n:,}' for k, n in sorted(counts.items()))}; "
            f"5xx {counts.get('5xx', 0)}, unanswered {counts.get('unanswered', 0)}, "
            f"findings {len(findings)}; queen RSS {before:.0f} -> "
            f"{rss_mib(queen.process.pid):.0f} MiB (peak {peak_rss_mib(queen.process.pid):.0f})")
        assert not findings, [(o.problem, repr(r)[:300]) for r, o in findings[:5]]
        assert answered == sum(counts.values()) >= CASES
        (kept,) = [h for h in httpx.get(f"{queen.url}/v1/hives").json()
                   if h["hive"]["id"] == "fuzz-anchor"]
        assert len(kept["workers"]) == 20
    finally:
        hive.__exit__(None, None, None)
        queen.__exit__(None, None, None)
