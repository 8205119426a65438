"""``/metrics`` checked by a real Prometheus: Debian's ``prometheus`` scrapes a real queen and a real
hive (its own process, a real worker in a cgroup) on 127.0.0.1, and its HTTP API must give back
the values the hive sent. ``promtool check metrics`` lints both expositions, and every PromQL
query of the Grafana dashboard in ``examples/grafana`` must return series.

A second hive, ``crafted``, is a heartbeat this test posts with exact figures (a GPU among them:
this machine has none), so the values can be compared to the byte.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml

from rbee.contract import EngineState, WorkerGpuUse, encode

from .builders import GIB, gpu, heartbeat, worker
from .conftest import RUN_ROOT, sleeper
from .daemons import Daemon
from .promkit import Prometheus, promtool_check, require_prometheus

DASHBOARD = Path(__file__).parents[1] / "examples" / "grafana" / "rbee-fleet.json"
MIB = 2**20


def crafted() -> bytes:
    return encode(heartbeat("crafted", [
        worker("w0", model="llama-3-8b", rss_mb=512.0, gpu_util_pct=37.0, vram_mb=20 * GIB,
               gpu_indices=[0], cpu_limit_pct=400.0, memory_limit_mb=32768.0,
               engine=EngineState(engine="vllm", requests_running=3, requests_waiting=2,
                                  kv_cache_pct=94.0),
               gpus=[WorkerGpuUse(index=0, uuid="GPU-00000000", vram_mb=20 * GIB, util_pct=37.0)]),
        worker("unknown-gpu", gpu_util_pct=None)],
        [msgspec.structs.replace(gpu(0, total_gib=80, used_gib=20, util_pct=41.0),
                                 temperature_c=55.0, power_w=310.5)]))


def post_crafted(queen) -> None:
    """(Again: the crafted hive sends no heartbeats of its own, and would go stale.)"""
    assert httpx.post(f"{queen.url}/v1/hive-heartbeat", content=crafted()).status_code == 200


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_prometheus()
    tmp = tmp_path_factory.mktemp("prometheus")
    root = f"{RUN_ROOT}/prometheus"
    with Daemon("rbee-queen", tmp / "queen.yaml", "port: 0\n") as queen:
        hive_config = {"id": "real-hive", "port": 0, "queen_url": queen.url,
                       "stop_workers_on_exit": True, "cgroup": {"root": root},
                       "collect": {"gpu": "none"}, "heartbeat": {"interval_s": 0.5},
                       "workers": [{"group": "llm", "instance": "sleeper", "argv": sleeper(),
                                    "cpu_limit": "150%", "memory_limit": "256M"}]}
        with Daemon("rbee-hive", tmp / "hive.yaml", yaml.safe_dump(hive_config),
                    cgroup_root=root) as hive:
            post_crafted(queen)
            prometheus = Prometheus(tmp, {"rbee-queen": queen.url, "rbee-hive": hive.url})
            try:
                yield queen, hive, prometheus
            finally:
                prometheus.close()


def value(result: list[dict]) -> float:
    [sample] = result
    return float(sample["value"][1])


def test_prometheus_reads_back_what_the_hives_sent(fleet):
    queen, hive, prometheus = fleet
    post_crafted(queen)
    crafted_worker = 'job="rbee-queen",hive="crafted",instance="w0"'
    assert value(prometheus.wait_for(f"rbee_worker_resident_memory_bytes{{{crafted_worker}}}")) \
        == 512 * MIB
    assert value(prometheus.query(f"rbee_worker_gpu_utilization_ratio{{{crafted_worker}}}")) == 0.37
    assert value(prometheus.query(f"rbee_worker_cpu_limit_ratio{{{crafted_worker}}}")) == 4.0
    assert value(prometheus.query(
        f"rbee_worker_engine_kv_cache_usage_ratio{{{crafted_worker}}}")) == 0.94
    assert value(prometheus.query(
        f"rbee_worker_engine_requests_waiting{{{crafted_worker}}}")) == 2
    [labels] = [r["metric"] for r in prometheus.query(
        f"rbee_worker_gpu_device_memory_bytes{{{crafted_worker}}}")]
    assert (labels["gpu"], labels["uuid"], labels["model"]) == ("0", "GPU-00000000", "llama-3-8b")
    gpu0 = 'job="rbee-queen",hive="crafted",gpu="0"'
    assert value(prometheus.query(f"rbee_gpu_memory_total_bytes{{{gpu0}}}")) == 80 * GIB * MIB
    assert value(prometheus.query(f"rbee_gpu_utilization_ratio{{{gpu0}}}")) == 0.41
    assert value(prometheus.query(f'rbee_gpu_health{{{gpu0},state="healthy"}}')) == 1.0
    assert value(prometheus.query(f"rbee_gpu_power_watts{{{gpu0}}}")) == 310.5
    # unknown is absent, never 0
    assert prometheus.query('rbee_worker_gpu_utilization_ratio{instance="unknown-gpu"}') == []
    # the real hive, through the queen and scraped directly (node_exporter style)
    for job in ("rbee-queen", "rbee-hive"):
        where = f'job="{job}",hive="real-hive",instance="sleeper"'
        assert value(prometheus.wait_for(f"rbee_worker_cpu_limit_ratio{{{where}}}")) == 1.5
        assert value(prometheus.query(f"rbee_worker_memory_limit_bytes{{{where}}}")) == 256 * MIB
    [sent] = httpx.get(f"{hive.url}/v1/workers").json()
    assert value(prometheus.query('rbee_worker_uptime_seconds{job="rbee-hive"}')) <= sent["uptime_s"] + 1
    assert value(prometheus.wait_for('rbee_hive_up{job="rbee-queen",hive="real-hive"}')) == 1.0
    assert value(prometheus.wait_for('rbee_queen_heartbeats_received_total')) >= 2


def test_promtool_accepts_both_expositions(fleet):
    queen, hive, _ = fleet
    for url in (queen.url, hive.url):
        text = httpx.get(f"{url}/metrics").text
        checked = promtool_check(text)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.strip() == "" and checked.stderr.strip() == "", checked.stderr


def test_openmetrics_by_content_negotiation(fleet):
    queen, _, _ = fleet
    response = httpx.get(f"{queen.url}/metrics",
                         headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "rbee_queen_heartbeats_received_total" in response.text
    plain = httpx.get(f"{queen.url}/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_every_dashboard_query_returns_series(fleet):
    queen, _, prometheus = fleet
    post_crafted(queen)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"].replace("$hive", ".*")
             for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 18
    deadline = time.monotonic() + 30
    empty = exprs
    while empty and time.monotonic() < deadline:  # rates need two scrapes
        empty = [expr for expr in empty if not prometheus.query(expr)]
        time.sleep(0.5)
    assert empty == []


def test_removed_hive_leaves_the_next_scrape(fleet):
    queen, _, _ = fleet
    extra = encode(heartbeat("short-lived", [worker("w")]))
    assert httpx.post(f"{queen.url}/v1/hive-heartbeat", content=extra).status_code == 200
    assert 'hive="short-lived"' in httpx.get(f"{queen.url}/metrics").text
    assert httpx.delete(f"{queen.url}/v1/hives/short-lived").status_code == 200
    assert 'hive="short-lived"' not in httpx.get(f"{queen.url}/metrics").text


def test_prometheus_scrapes_with_the_read_token(tmp_path):
    """A queen asking for a read token: the job with ``authorization.credentials_file`` scrapes
    it, the job without gets 401 (``up`` 0)."""
    token = tmp_path / "read-token"
    token.write_text("prometheus-read-token-0123456789\n")
    with Daemon("rbee-queen", tmp_path / "queen.yaml",
                f"port: 0\nread_token_file: {token}\n") as queen:
        post_crafted(queen)
        prometheus = Prometheus(tmp_path, {"with-token": queen.url, "without": queen.url},
                                credentials_files={"with-token": token})
        try:
            assert value(prometheus.wait_for('up{job="with-token"} == 1')) == 1
            assert prometheus.wait_for('rbee_hive_up{job="with-token"}')
            assert value(prometheus.wait_for('up{job="without"}')) == 0
        finally:
            prometheus.close()
