"""A mutation fuzzer against a real ``rbee-queen`` and a real ``rbee-hive`` over real HTTP.

CI-sized (``FUZZ_CASES`` cases, derandomized so a run is repeatable; ``bench/test_bench_fuzz.py``
is the long, random run). Every case must be answered, never with a 5xx, and every error must be
the promised JSON; afterwards the registry still holds what it held, every record in it still
decodes (so ``rbee workers`` works), both daemons are alive without a traceback in their logs,
and the queen's resident memory grew by less than ``RSS_GROWTH_MIB``.
"""

from __future__ import annotations

import os

import httpx
import msgspec
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from rbee.contract import FleetWorker, HiveState, encode

from .builders import fleet_heartbeat
from .daemons import Daemon
from .fuzzkit import Outcome, empty_path_env, fuzz_requests, rss_mib, run_case

FUZZ_CASES = int(os.environ.get("RBEE_FUZZ_CASES", "2500"))
RSS_GROWTH_MIB = 120


def fuzz_daemons(tmp_path) -> tuple[Daemon, Daemon]:
    queen = Daemon("rbee-queen", tmp_path / "queen.yaml", yaml.safe_dump({
        "port": 0, "registry": {"stale_after_s": 600, "remove_after_s": 3600}}))
    queen.__enter__()
    try:
        hive = Daemon("rbee-hive", tmp_path / "hive.yaml", yaml.safe_dump({
            "id": "fuzz-hive-daemon", "port": 0, "queen_url": queen.url,
            "stop_workers_on_exit": True, "cgroup": {"backend": "none"},
            "collect": {"gpu": "none"}}), env=empty_path_env(tmp_path / "no-programs"))
        hive.__enter__()
    except BaseException:
        queen.__exit__(None, None, None)
        raise
    return queen, hive


def fuzz(queen_url: str, hive_url: str, cases: int, *, derandomize: bool
         ) -> tuple[dict[str, int], list[tuple[object, Outcome]]]:
    """Run ``cases`` fuzz cases; returns the count of answers by status class and the findings."""
    counts: dict[str, int] = {}
    findings: list[tuple[object, Outcome]] = []
    timeout = httpx.Timeout(5.0)
    with httpx.Client(base_url=queen_url, timeout=timeout) as queen, \
            httpx.Client(base_url=hive_url, timeout=timeout) as hive:
        clients = {"queen": queen, "hive": hive}

        @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(fuzz_requests())
        def one_case(request) -> None:
            outcome = run_case(clients, request)
            key = "unanswered" if outcome.status is None else f"{outcome.status // 100}xx"
            counts[key] = counts.get(key, 0) + 1
            if outcome.problem:
                findings.append((request, outcome))

        one_case()
    return counts, findings


def test_fuzzed_requests_never_cost_a_5xx_an_answer_or_the_registry(tmp_path):
    queen, hive = fuzz_daemons(tmp_path)
    try:
        anchor = fleet_heartbeat("fuzz-anchor", 20)
        response = httpx.post(f"{queen.url}/v1/hive-heartbeat", content=encode(anchor))
        assert response.status_code == 200, response.text
        rss_before = rss_mib(queen.process.pid)

        counts, findings = fuzz(queen.url, hive.url, FUZZ_CASES, derandomize=True)

        assert sum(counts.values()) >= FUZZ_CASES
        assert not findings, "\n".join(f"{o.problem}\n  <- {r!r:.600}" for r, o in findings[:5])
        assert counts.get("4xx", 0) > FUZZ_CASES / 3  # the mutations did reach the validation
        assert counts.get("2xx", 0) > 0  # ... and some mutants were still valid
        hives = msgspec.json.decode(httpx.get(f"{queen.url}/v1/hives").content,
                                    type=list[HiveState])
        (kept,) = [h for h in hives if h.hive.id == "fuzz-anchor"]
        assert kept.workers == anchor.workers and kept.capabilities == anchor.capabilities
        msgspec.json.decode(httpx.get(f"{queen.url}/v1/workers").content, type=list[FleetWorker])
        growth = rss_mib(queen.process.pid) - rss_before
        assert growth < RSS_GROWTH_MIB, f"the queen grew by {growth:.0f} MiB"
        assert queen.process.poll() is None and hive.process.poll() is None
        for daemon in (queen, hive):
            assert "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]
    finally:
        hive.__exit__(None, None, None)
        queen.__exit__(None, None, None)
