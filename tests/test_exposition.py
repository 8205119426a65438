"""The fleet's exposition (``rbee.exposition``): rbee's fast writer and the prometheus-client
collector give the same samples; both formats parse with prometheus-client's own parsers (the
OpenMetrics one is strict); label values are escaped; unknown figures are absent; past
``metrics.max_workers`` a queen lists its hives alone, and says so; ``name[]`` selects samples."""

from __future__ import annotations

import logging

import httpx
import msgspec
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from rbee.contract import (
    Degraded,
    EngineState,
    GpuFault,
    GpuFaultKind,
    GpuUtilSource,
    HiveRecord,
    Unhealthy,
    WorkerGpuUse,
    WorkerState,
)
from rbee.exposition import PART, FleetCollector, fleet_parts, fleet_text
from rbee.http.transport import ConnectionTable
from rbee.queen.metrics import QueenMetrics
from rbee.scrape import render

from .builders import GIB, fleet_heartbeat, gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of

MIB = 2**20


def records() -> list[HiveRecord]:
    odd = worker("w0", model='say "hi"\\ \nbye', gpu_util_pct=None, gpus=[
        WorkerGpuUse(index=0, uuid="MIG-1", vram_mb=3 * GIB, util_pct=None),
        WorkerGpuUse(index=1, uuid="GPU-00000001", vram_mb=None, util_pct=55.0,
                     util_source=GpuUtilSource.DEVICE)])
    sick = msgspec.structs.replace(
        gpu(1, total_gib=80, used_gib=8), temperature_c=61.0, faults=[
            GpuFault(kind=GpuFaultKind.XID, fatal=True, detail="Xid 79"),
            GpuFault(kind=GpuFaultKind.XID, fatal=True, detail="Xid 79 again"),
            GpuFault(kind=GpuFaultKind.THERMAL_SLOWDOWN, fatal=False, detail="hot")],
        health=Unhealthy(reason="xid"))
    mig = msgspec.structs.replace(gpu(0, total_gib=20, used_gib=3), uuid="MIG-1", util_pct=None,
                                  mig_parent_uuid="GPU-00000000", mig_instance_id=1)
    served = worker("w1", engine=EngineState(engine="vllm", requests_running=12,
                                             requests_waiting=7, kv_cache_pct=94.0,
                                             ttft_p95_s=0.975))
    one = heartbeat("a", [odd, served], [mig, sick], health=Degraded(reason="GPU 1"))
    two = fleet_heartbeat("b", 3)
    return [HiveRecord(info=one.hive, workers=one.workers, gpus=one.capabilities, silent_s=0.5),
            HiveRecord(info=two.hive, workers=two.workers, gpus=two.capabilities, stale=True,
                       silent_s=7.25)]


def samples(families) -> list[tuple]:
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                  for f in families for s in f.samples if not s.name.endswith("_created"))


def test_fast_writer_and_collector_give_the_same_samples():
    fleet = records()
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: fleet))
    collector = samples(parse_text(generate_latest(registry).decode()))
    fast = samples(parse_text(fleet_text(fleet, openmetrics=False)))
    assert fast == collector and len(fast) > 100


def test_openmetrics_is_strictly_valid_and_has_the_same_samples():
    fleet = records()
    body, content_type = render(CollectorRegistry(), "application/openmetrics-text; version=1.0.0",
                                lambda: fleet)
    assert content_type.startswith("application/openmetrics-text")
    strict = list(parse_openmetrics(body.decode()))  # raises on any violation
    assert {f.name: f.type for f in strict}["rbee_hive"] == "info"
    assert samples(strict) == samples(parse_text(fleet_text(fleet, openmetrics=False)))


def test_values_labels_escaping_and_absence():
    by_key = {}
    for name, labels, value in samples(parse_text(fleet_text(records(), openmetrics=False))):
        by_key.setdefault(name, []).append((dict(labels), value))
    [(labels, rss)] = [x for x in by_key["rbee_worker_resident_memory_bytes"]
                       if x[0]["instance"] == "w0"]
    assert labels["model"] == 'say "hi"\\ \nbye' and rss == 512 * MIB  # escaped and read back
    assert [x[0]["instance"] for x in by_key["rbee_worker_gpu_utilization_ratio"]
            if x[0]["hive"] == "a"] == ["w1"]  # w0's is unknown: absent, not 0
    [(labels, util)] = [x for x in by_key["rbee_worker_gpu_device_utilization_ratio"]
                        if x[0]["hive"] == "a"]
    assert (labels["uuid"], labels["source"], util) == ("GPU-00000001", "device", 0.55)
    assert [x[0]["uuid"] for x in by_key["rbee_worker_gpu_device_memory_bytes"]
            if x[0]["hive"] == "a"] == ["MIG-1"]
    assert [x[0]["instance"] for x in by_key["rbee_worker_gpu_memory_bytes"]
            if x[0]["hive"] == "a"] == ["w0"]  # w1 is on no GPU: absent, not 0
    faults = {(x[0]["kind"], x[0]["fatal"]): x[1] for x in by_key["rbee_gpu_faults"]}
    assert faults == {("xid", "true"): 2.0, ("thermal_slowdown", "false"): 1.0}
    health = {(x[0]["hive"], x[0]["gpu"], x[0]["state"]): x[1] for x in by_key["rbee_gpu_health"]}
    assert health[("a", "1", "unhealthy")] == 1.0 and health[("a", "1", "healthy")] == 0.0
    assert {x[0]["mig_parent"] for x in by_key["rbee_gpu_memory_total_bytes"]
            if x[0]["hive"] == "a"} == {"GPU-00000000", ""}
    up = {x[0]["hive"]: x[1] for x in by_key["rbee_hive_up"]}
    age = {x[0]["hive"]: x[1] for x in by_key["rbee_hive_heartbeat_age_seconds"]}
    assert up == {"a": 1.0, "b": 0.0} and age == {"a": 0.5, "b": 7.25}
    engine = {name: [(x[0]["instance"], x[1]) for x in by_key.get(name, []) if x[0]["hive"] == "a"]
              for name in ("rbee_worker_engine_requests_running",
                           "rbee_worker_engine_requests_waiting",
                           "rbee_worker_engine_kv_cache_usage_ratio",
                           "rbee_worker_engine_generation_tokens_per_second",
                           "rbee_worker_engine_time_to_first_token_p95_seconds")}
    assert engine == {  # w0 has no engine state, w1's has no rates yet: absent, not 0
        "rbee_worker_engine_requests_running": [("w1", 12.0)],
        "rbee_worker_engine_requests_waiting": [("w1", 7.0)],
        "rbee_worker_engine_kv_cache_usage_ratio": [("w1", 0.94)],
        "rbee_worker_engine_generation_tokens_per_second": [],
        "rbee_worker_engine_time_to_first_token_p95_seconds": [("w1", 0.975)]}
    mig_util = [x for x in by_key.get("rbee_gpu_utilization_ratio", []) if x[0]["uuid"] == "MIG-1"]
    assert mig_util == []  # the driver gives none for a MIG instance


def test_worker_restarts_oom_kills_and_state():
    """Issue 22 items 4 and 5: restarts and OOM kills as counters, the state as a labelled 1,
    for a worker that is down too (both writers, both formats)."""
    down = worker("w9", state=WorkerState.CRASHLOOP, restarts=4, oom_kills=2)
    beat = heartbeat("c", [worker("w8"), down])
    fleet = [HiveRecord(info=beat.hive, workers=beat.workers, gpus=[])]
    body, _ = render(CollectorRegistry(), "application/openmetrics-text; version=1.0.0",
                     lambda: fleet)
    strict = list(parse_openmetrics(body.decode()))
    types = {f.name: f.type for f in strict}
    assert types["rbee_worker_restarts"] == types["rbee_worker_oom_kills"] == "counter"
    found = {(name, dict(labels).get("instance"), dict(labels).get("state")): value
             for name, labels, value in samples(strict)}
    assert found[("rbee_worker_restarts_total", "w9", None)] == 4
    assert found[("rbee_worker_oom_kills_total", "w9", None)] == 2
    assert found[("rbee_worker_restarts_total", "w8", None)] == 0
    assert found[("rbee_worker_state", "w9", "crashloop")] == 1
    assert found[("rbee_worker_state", "w8", "running")] == 1
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: fleet))
    assert samples(parse_text(generate_latest(registry).decode())) == samples(
        parse_text(fleet_text(fleet, openmetrics=False)))


def test_hive_families_alone_without_detail():
    """``detail=False``: each hive's families, and no worker's, GPU's or plugin's sample."""
    fleet = records()
    for openmetrics in (False, True):
        text = fleet_text(fleet, openmetrics, detail=False)
        parse = parse_openmetrics if openmetrics else parse_text
        names = {s.name for f in parse(text + ("# EOF\n" if openmetrics else ""))
                 for s in f.samples}
        assert {"rbee_hive_up", "rbee_hive_workers", "rbee_hive_health",
                "rbee_hive_heartbeat_age_seconds", "rbee_hive_info"} <= names
        assert not [n for n in names if not n.startswith("rbee_hive")], names


def test_names_select_families_and_the_fleet_is_not_walked_for_the_queens_own():
    """``name[]`` as prometheus-client's handler takes it: by family or sample name, both
    formats; a name of the queen's own asks nothing of the fleet (``hives`` is never called)."""
    fleet = records()
    registry = CollectorRegistry()
    Counter("rbee_queen_heartbeats_received", "Heartbeats", registry=registry).inc(3)
    for accept, parse in ((None, parse_text),
                          ("application/openmetrics-text; version=1.0.0", parse_openmetrics)):
        asked = frozenset({"rbee_worker_restarts_total", "rbee_hive", "rbee_gpu_health"})
        body, _ = render(registry, accept, lambda: fleet, names=asked)
        got = samples(parse(body.decode()))
        assert {name for name, _, _ in got} == {"rbee_worker_restarts_total", "rbee_hive_info",
                                                "rbee_gpu_health"}
        whole, _ = render(registry, accept, lambda: fleet)
        assert got == [x for x in samples(parse(whole.decode())) if x[0] in
                       {"rbee_worker_restarts_total", "rbee_hive_info", "rbee_gpu_health"}]

        def walked() -> list[HiveRecord]:
            raise AssertionError("the fleet was walked for the queen's own counter")

        body, _ = render(registry, accept, walked,
                         names=frozenset({"rbee_queen_heartbeats_received_total"}))
        assert samples(parse(body.decode())) == [
            ("rbee_queen_heartbeats_received_total", (), 3.0)]
    hives_only = fleet_text(fleet, False, names=frozenset({"rbee_hive_up"}))
    assert {s.name for f in parse_text(hives_only) for s in f.samples} == {"rbee_hive_up"}


def test_the_queens_own_figures_read_no_record_of_a_hive():
    """The queen's hive and worker counts come from ``counts``: a scrape of its own figures
    builds no record per hive (``records`` is never called)."""

    class Counted:
        def records(self) -> list[HiveRecord]:
            raise AssertionError("a record per hive was built for the queen's own figures")

        def counts(self) -> tuple[int, int]:
            return 3, 24

    metrics = QueenMetrics(Counted(), lambda: 0, lambda: 0, ConnectionTable(10))
    body, _ = render(metrics.registry, None, metrics.records, metrics.detail,
                     names=frozenset({"rbee_queen_hives", "rbee_queen_workers"}))
    assert samples(parse_text(body.decode())) == [("rbee_queen_hives", (), 3.0),
                                                  ("rbee_queen_workers", (), 24.0)]


def test_a_large_fleet_is_written_in_bounded_parts():
    """The route writes the fleet on the event loop and lets every ready task go between two
    parts (``fleet_parts``): no part may cover more than ``PART`` workers, GPUs or hives, so a
    scrape of 20,000 workers holds heartbeats for a part's time, never the whole scrape's."""
    beats = [fleet_heartbeat(f"h{i:03d}", 8) for i in range(100)]  # 800 workers, 800 GPUs
    fleet = [HiveRecord(info=b.hive, workers=b.workers, gpus=b.capabilities) for b in beats]
    parts = list(fleet_parts(fleet, openmetrics=False))
    assert "".join(parts) == fleet_text(fleet, openmetrics=False)
    for part in parts:
        entities = {line.split("{", 1)[1].split(",gpu=")[0].split(",state=")[0]
                    for line in part.splitlines() if not line.startswith("#")}
        assert len(entities) <= PART, part[:200]
    # a family of every worker's (800) or GPU's comes in four parts
    for sample in ("rbee_worker_cpu_ratio{", "rbee_gpu_memory_total_bytes{"):
        assert len([p for p in parts if sample in p]) == -(-800 // PART) == 4


async def test_the_queen_leaves_workers_out_past_metrics_max_workers(nursery, caplog):
    """A real queen with ``metrics.max_workers: 4``: three workers are listed; six are not, and
    the queen says how many it left out (a gauge and one log line); back under, listed again."""
    queen = await start_queen(nursery, metrics={"max_workers": 4})
    url = url_of(queen)

    listed: list[tuple] = []

    async def scrape(client: httpx.AsyncClient) -> dict[tuple, float]:
        """Each sample by name and hive (the last of a hive's workers); every one in ``listed``."""
        response = await client.get(f"{url}/metrics", headers={
            "accept": "application/openmetrics-text; version=1.0.0"})
        assert response.status_code == 200
        listed[:] = samples(parse_openmetrics(response.text))
        return {(name, dict(labels).get("hive")): value for name, labels, value in listed}

    async with httpx.AsyncClient(timeout=10) as client:
        await post_heartbeat(client, queen, fleet_heartbeat("a", 3))
        found = await scrape(client)
        assert found[("rbee_queen_metrics_workers_omitted", None)] == 0
        assert [dict(labels)["instance"] for name, labels, _ in listed
                if name == "rbee_worker_cpu_ratio"] == ["worker-000", "worker-001", "worker-002"]
        assert len([name for name, _, _ in listed if name == "rbee_gpu_memory_total_bytes"]) == 8

        with caplog.at_level(logging.WARNING, logger="rbee.queen"):
            await post_heartbeat(client, queen, fleet_heartbeat("b", 3))
            found = await scrape(client)
            await scrape(client)  # said once, when it turns
        assert found[("rbee_queen_metrics_workers_omitted", None)] == 6
        assert not [n for n, _ in found if n.startswith(("rbee_worker_", "rbee_gpu_"))]
        assert found[("rbee_hive_workers", "b")] == 3 and found[("rbee_hive_up", "a")] == 1
        assert found[("rbee_queen_workers", None)] == 6
        said = [r.getMessage() for r in caplog.records if "metrics.max_workers" in r.getMessage()]
        assert said == ["/metrics leaves out the workers' and GPUs' series: 6 workers, more than "
                        "metrics.max_workers (4); each hive's /metrics has its own"]

        assert (await client.delete(f"{url}/v1/hives/b")).status_code == 200
        found = await scrape(client)
        assert found[("rbee_queen_metrics_workers_omitted", None)] == 0

        own = await client.get(f"{url}/metrics", params=[
            ("name[]", "rbee_queen_heartbeats_received_total"), ("name[]", "rbee_hive_up")])
        assert own.status_code == 200
        assert samples(parse_text(own.text)) == [
            ("rbee_hive_up", (("hive", "a"),), 1.0),
            ("rbee_queen_heartbeats_received_total", (), 2.0)]
        assert ("rbee_worker_cpu_ratio", "a") in found and ("rbee_hive_up", "b") not in found
