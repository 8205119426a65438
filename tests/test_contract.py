"""The telemetry contract: field names of the original, validation naming the field."""

from __future__ import annotations

import json

import pytest

from rbee import (
    ContractError,
    Degraded,
    Healthy,
    HiveHeartbeat,
    HiveInfo,
    OperationalStatus,
    WorkerTelemetry,
    decode_heartbeat,
    encode,
)
from rbee.contract import utc_now

ORIGINAL_FIELDS = ["pid", "group", "instance", "cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s",
                   "uptime_s", "gpu_util_pct", "vram_mb", "total_vram_mb", "model"]


def worker(**overrides) -> WorkerTelemetry:
    fields = dict(pid=10, group="llm", instance="a", cpu_pct=1.5, rss_mb=100, io_r_mb_s=0.0,
                  io_w_mb_s=0.0, uptime_s=5, gpu_util_pct=0.0, vram_mb=0, total_vram_mb=0,
                  model=None)
    fields.update(overrides)
    return WorkerTelemetry(**fields)


def heartbeat(workers=()) -> HiveHeartbeat:
    return HiveHeartbeat(
        hive=HiveInfo(id="hive-1", hostname="gpu-01", port=7835,
                      operational_status=OperationalStatus.READY, health_status=Healthy(),
                      version="0.1.0"),
        timestamp=utc_now(), workers=list(workers))


def test_original_fields_always_present_and_new_ones_only_when_set():
    data = json.loads(encode(worker()))
    assert list(data) == ORIGINAL_FIELDS  # model null included, defaults of new fields left out
    data = json.loads(encode(worker(gpu_indices=[0], state="exited")))
    assert data["gpu_indices"] == [0] and data["state"] == "exited"


def test_heartbeat_round_trip_and_wire_shapes():
    original = heartbeat([worker(model="llama")])
    original.hive.health_status = Degraded(reason="GPU refresh timed out")
    data = json.loads(encode(original))
    assert data["hive"]["operational_status"] == "ready"
    assert data["hive"]["health_status"] == {"status": "degraded", "reason": "GPU refresh timed out"}
    assert data["timestamp"].endswith("Z")
    assert decode_heartbeat(encode(original)) == original


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["workers"][0].update(pid="ten"), "$.workers[0].pid"),
    (lambda d: d["workers"][0].update(cpu_pct=-1.0), "$.workers[0].cpu_pct"),
    (lambda d: d["hive"].update(operational_status="dancing"), "$.hive.operational_status"),
    (lambda d: d["hive"].update(health_status={"status": "meh"}), "$.hive.health_status"),
    (lambda d: d.pop("hive"), "hive"),
    (lambda d: d.update(timestamp="2025-01-01T00:00:00"), "$.timestamp"),
])
def test_decoding_rejects_bad_payloads_naming_the_field(mutate, field):
    data = json.loads(encode(heartbeat([worker()])))
    mutate(data)
    with pytest.raises(ContractError) as caught:
        decode_heartbeat(json.dumps(data))
    assert field in str(caught.value)


def test_malformed_json_is_a_contract_error():
    with pytest.raises(ContractError, match="invalid heartbeat"):
        decode_heartbeat(b"{not json")


def test_unknown_fields_are_ignored_for_forward_compatibility():
    data = json.loads(encode(heartbeat([worker()])))
    data["workers"][0]["future_metric"] = 1
    assert decode_heartbeat(json.dumps(data)).workers[0].pid == 10


def test_stream_event_round_trip_names_a_bad_field():
    from rbee import ContractError, QueenEvent, decode_stream_event, encode
    from rbee.contract import utc_now

    event = QueenEvent(workers_online=1, workers_available=0, hives_online=1, hives_available=1,
                       worker_ids=["h/llm/a"], hive_ids=["h"], timestamp=utc_now())
    assert decode_stream_event(encode(event)) == event
    with pytest.raises(ContractError, match=r"\$\.workers_online"):
        decode_stream_event(encode(event).replace(b'"workers_online":1', b'"workers_online":-1'))


def test_worker_lifecycle_fields_round_trip_and_are_bounded():
    """Issue 22 items 4 and 5: state, restarts, OOM kills, the last exit (with its stderr tail)
    and the next attempt travel with defaults left out; a tail past its bounds is refused."""
    from datetime import timedelta

    from rbee import WorkerExit, WorkerState

    ending = WorkerExit(at=utc_now(), pid=77, signal="SIGKILL", oom_killed=True, ran_s=90.5,
                        stderr_tail=["allocating", "Killed"])
    down = worker(state=WorkerState.CRASHLOOP, restarts=5, oom_kills=3, last_exit=ending,
                  next_attempt_at=utc_now() + timedelta(seconds=30))
    data = json.loads(encode(heartbeat([down])))["workers"][0]
    assert data["state"] == "crashloop" and (data["restarts"], data["oom_kills"]) == (5, 3)
    assert data["last_exit"] == {"at": data["last_exit"]["at"], "pid": 77, "signal": "SIGKILL",
                                 "oom_killed": True, "ran_s": 90.5,
                                 "stderr_tail": ["allocating", "Killed"]}
    assert decode_heartbeat(encode(heartbeat([down]))).workers == [down]
    raw = json.loads(encode(heartbeat([down])))
    raw["workers"][0]["last_exit"]["stderr_tail"] = ["x"] * 9
    with pytest.raises(ContractError, match=r"\$\.workers\[0\]\.last_exit\.stderr_tail"):
        decode_heartbeat(json.dumps(raw).encode())
    raw["workers"][0]["last_exit"]["stderr_tail"] = ["x" * 161]
    with pytest.raises(ContractError, match="stderr_tail"):
        decode_heartbeat(json.dumps(raw).encode())
