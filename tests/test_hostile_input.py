"""Bad input as a hostile client sends it, against a real queen and a real hive over HTTP: never a
5xx, never a wrong answer, never unbounded memory; the contract's bounds, the hive's side of them,
quoted and rate-limited logs, escaped terminal output."""

from __future__ import annotations

import gc
import json
import logging
import socket
import tracemalloc

import httpx
import msgspec
import pytest
import trio

from rbee._errors import ContractError, SpawnError
from rbee._logs import RateLimitedLog
from rbee.contract import (
    LONG_TEXT_CHARS,
    MAX_FIGURE,
    MAX_METRICS,
    MIB,
    SHORT_TEXT_CHARS,
    CollectorIssue,
    Degraded,
    FleetWorker,
    HiveTelemetryEvent,
    decode_heartbeat,
    encode,
    utc_now,
)
from rbee.fleetview import FleetView
from rbee.hive.fitting import fit_gpu, fit_worker
from rbee.hive.service import HiveService
from rbee.queen.registry import HiveRegistry
from rbee.terminal import printable

from .builders import fleet_heartbeat, gpu, heartbeat, worker
from .conftest import sleeper
from .hivekit import hive_config
from .queenkit import post_heartbeat, start_queen, url_of
from .test_cli import rbee


@pytest.fixture
async def queen(nursery):
    return await start_queen(nursery, http={"max_body_bytes": 64 * 1024},
                             registry={"max_workers_per_hive": 50},
                             stream={"queen_interval_s": 3600, "keepalive_s": 3600})


@pytest.fixture
async def client(queen):
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5.0) as client:
        yield client


@pytest.fixture
async def hive_url(nursery, queen, tmp_path):
    """A real hive service (agent, heartbeat sender, HTTP API) reporting to ``queen``."""
    service = HiveService(hive_config("hostile", port=0, queen_url=url_of(queen),
                                      cgroup={"backend": "none"}))
    return (await nursery.start(service.run))[0]


def heartbeat_json(**hive_fields) -> dict:
    data = json.loads(encode(heartbeat("hive-x", [worker("a")], [gpu(0, total_gib=80,
                                                                       used_gib=1)])))
    data["hive"].update(hive_fields)
    return data


# -- decoders: every exception a 400 naming the problem ----------------------------------------

DEEP = b"[" * 5000 + b"]" * 5000
UNDECODABLE = [
    (lambda body: body[:-1] + b',"future":' + DEEP + b"}", "JSON nested too deeply"),
    (lambda body: body.replace(b'"cpu_pct":12.5', b'"cpu_pct":1e999', 1),
     "Number out of range - at `$.workers[0].cpu_pct`"),
    (lambda body: body.replace(b'"cpu_pct":12.5', b'"cpu_pct":NaN', 1), "JSON is malformed"),
]


@pytest.mark.parametrize("corrupt, problem", UNDECODABLE)
async def test_undecodable_heartbeat_is_a_400_naming_the_problem(queen, client, corrupt, problem):
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("kept")]))
    body = corrupt(encode(heartbeat("hive", [worker("a")])))
    response = await client.post("/v1/hive-heartbeat", content=body)
    assert response.status_code == 400, response.text
    assert problem in response.json()["message"]
    assert queen.registry.hive_ids() == ["hive-a"]


async def test_invalid_utf8_in_a_heartbeat_is_a_400_in_rbees_words(queen, client):
    """rbee's words, the same whichever way msgspec reports it (0.22: UnicodeDecodeError; 0.23:
    its own DecodeError "Invalid UTF-8 encoded string", with no position): the byte and where."""
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("kept")]))
    body = encode(heartbeat("hive", [worker("a")])).replace(b'"hive.test"', b'"gpu\xffhost"', 1)
    response = await client.post("/v1/hive-heartbeat", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["message"] == (
        f"invalid heartbeat: not valid UTF-8 (byte b'\\xff' at offset {body.index(0xFF)})")
    assert queen.registry.hive_ids() == ["hive-a"]


@pytest.mark.parametrize("body, problem", [
    (b'{"group": "llm", "instance": "a\xff", "argv": ["x"]}',
     "invalid worker: not valid UTF-8 (byte b'\\xff' at offset 31)"),
    (b'{"group": "llm", "instance": "a", "argv": ["x"], "restart_backoff_s": 1e999}',
     "Number out of range - at `$.restart_backoff_s`"),
    (b'{"group": "llm/x", "instance": "a", "argv": ["x"]}', "at `$.group`"),
    (b'{"group": "llm", "instance": "a", "argv": ["x"], "cpu_limit": "12Q"}',
     "invalid CPU limit '12Q'"),
])
async def test_undecodable_worker_spec_is_a_400_at_the_hive(hive_url, body, problem):
    async with httpx.AsyncClient(base_url=hive_url, timeout=5.0) as hive:
        response = await hive.post("/v1/workers", content=body)
        assert response.status_code == 400, response.text
        assert problem in response.json()["message"]
        assert (await hive.get("/v1/workers")).json() == []


# -- the contract's bounds -----------------------------------------------------------------------

def _with_worker(**fields) -> dict:
    data = heartbeat_json()
    data["workers"][0].update(fields)
    return data


BEYOND_BOUNDS = [
    (heartbeat_json(id="rack1/gpu-07"), "$.hive.id"),
    (heartbeat_json(id="gpu\n2026-11-27 INFO forged"), "$.hive.id"),
    (heartbeat_json(id="gpu 07"), "$.hive.id"),
    (heartbeat_json(id="x" * 129), "$.hive.id"),
    (heartbeat_json(hostname="h" * (SHORT_TEXT_CHARS + 1)), "$.hive.hostname"),
    (_with_worker(group="b/c"), "'b/c' is not a group or instance name: 1-128 characters of "
                                "[A-Za-z0-9_.-], the first a letter or digit - at "
                                "`$.workers[0].group`"),
    (_with_worker(instance="\x1b[2J"), "'\\x1b[2J' is not a group or instance name: "),
    (_with_worker(instance="a b"), "the first a letter or digit - at `$.workers[0].instance`"),
    (_with_worker(instance="i" * 129), "$.workers[0].instance"),
    (_with_worker(model="m" * (SHORT_TEXT_CHARS + 1)), "$.workers[0].model"),
    (_with_worker(errors=[{"collector": "gpu", "message": "e" * (LONG_TEXT_CHARS + 1)}]),
     "$.workers[0].errors[0].message"),
    (_with_worker(metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}), "$.workers[0].metrics"),
    (_with_worker(metrics={"bad key": 1.0}), "$.workers[0].metrics"),
    (_with_worker(metrics={"k" * 65: 1.0}), "$.workers[0].metrics"),
    (_with_worker(metrics={"plugin.x": "text"}), "$.workers[0].metrics"),
    (_with_worker(metrics={"plugin.x": 1e300}), "$.workers[0].metrics"),
    (_with_worker(rss_mb=2**64), "$.workers[0].rss_mb"),
    (_with_worker(pid=2**22 + 1), "$.workers[0].pid"),
    (_with_worker(gpu_indices=[256]), "$.workers[0].gpu_indices[0]"),
    (dict(heartbeat_json(), capabilities=[{**heartbeat_json()["capabilities"][0],
                                           "vram_total_mb": 1.7e308}]),
     "$.capabilities[0].vram_total_mb"),
    (dict(heartbeat_json(), workers=heartbeat_json()["workers"] * 51),
     "51 workers, more than registry.max_workers_per_hive (50) - at `$.workers`"),
]


@pytest.mark.parametrize("data, field", BEYOND_BOUNDS)
async def test_beyond_the_bounds_is_refused_naming_the_field(queen, client, data, field):
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("kept")]))
    response = await client.post("/v1/hive-heartbeat", content=json.dumps(data))
    assert response.status_code == 400, response.text
    assert field in response.json()["message"]
    assert queen.registry.hive_ids() == ["hive-a"]


async def test_vram_sums_stay_finite_and_rbee_workers_reads_the_fleet(queen, client):
    """The issue's case: two GPUs of the largest size a hive may report and a worker on both.
    The sum is finite, the queen's JSON has no null, and ``rbee workers`` lists the fleet."""
    huge = [gpu(i, total_gib=MAX_FIGURE / 1024, used_gib=0) for i in range(2)]
    await post_heartbeat(client, queen, heartbeat(
        "hive-big", [worker("both", gpu_indices=[0, 1], vram_mb=MAX_FIGURE)], huge))
    (listed,) = (await client.get("/v1/workers")).json()
    assert listed["vram"]["total_mb"] == 2 * MAX_FIGURE
    result = await trio.to_thread.run_sync(lambda: rbee("workers", "--queen", url_of(queen)))
    assert result.returncode == 0, result.stderr
    assert "\n1 worker\n" in result.stdout


async def test_worker_ids_cannot_collide_and_every_hive_is_one_path_segment(queen, client):
    await post_heartbeat(client, queen, heartbeat("a", [worker("d", group="b-c")]))
    colliding = encode(heartbeat("a", [worker("d", group="b-c")])).replace(b'"b-c"', b'"b/c"')
    response = await client.post("/v1/hive-heartbeat", content=colliding)
    assert response.status_code == 400
    (listed,) = msgspec.json.decode((await client.get("/v1/workers")).content,
                                    type=list[FleetWorker])
    assert listed.id == "a/b-c/d"
    assert (await client.get("/v1/hives/a")).status_code == 200


@pytest.mark.parametrize("path, params", [
    ("/v1/history", {"step": "inf"}), ("/v1/history", {"since": "1e999"}),
    ("/v1/workers", {"min_free_vram_mb": "inf"}),
])
async def test_query_numbers_must_be_finite(client, path, params):
    response = await client.get(path, params=params)
    assert response.status_code == 400
    assert "must be a finite number" in response.json()["message"]


# -- wire types: the original's u64 fields ------------------------------------------------------

async def test_whole_mib_fields_are_sent_as_integers_and_floats_still_accepted(
        nursery, queen, client):
    agent_config = hive_config("wire", workers=[{"group": "llm", "instance": "a",
                                                  "argv": sleeper()}])
    from .hivekit import start_hive

    agent, _ = await start_hive(nursery, agent_config)
    with trio.fail_after(5):
        while not (agent.latest.workers and agent.latest.workers[0].rss_bytes):
            await agent.wait_changed()
    sent = json.loads(encode(agent.latest))["workers"][0]
    for name in ("rss_mb", "vram_mb", "total_vram_mb", "uptime_s", "rss_bytes"):
        assert type(sent[name]) is int, (name, sent[name])
    assert sent["rss_mb"] == round(sent["rss_bytes"] / MIB)

    older = json.loads(encode(heartbeat("hive-old", [worker("a")])))
    older["workers"][0].update(rss_mb=19.83, vram_mb=0.0, total_vram_mb=81559.0)
    response = await client.post("/v1/hive-heartbeat", content=json.dumps(older))
    assert response.status_code == 200, response.text
    (listed,) = (await client.get("/v1/workers")).json()
    assert (listed["worker"]["rss_mb"], listed["worker"]["vram_mb"],
            listed["worker"]["total_vram_mb"]) == (20, 0, 81559)
    assert listed["worker"]["rss_bytes"] == round(19.83 * MIB)


# -- the hive's side of the bounds --------------------------------------------------------------

def test_a_hive_cuts_what_it_collected_to_the_bounds_and_says_so():
    record = worker("a", model="m" * 10_000)
    record.metrics = {**{f"plugin.m{i}": float(i) for i in range(100)},
                      "bad key": 1.0, "plugin.nan": float("nan"), "plugin.big": 1e300}
    record.errors = [CollectorIssue(collector="c" * 999, message="e" * 99_999)] * 40
    record.cpu_pct = float("inf")
    record.rss_mb = 19.83
    fit_worker(record)
    decoded = decode_heartbeat(encode(heartbeat("hive-a", [record]))).workers[0]
    assert decoded.model.startswith("mmm") and len(decoded.model) == SHORT_TEXT_CHARS
    assert list(decoded.metrics) == [f"plugin.m{i}" for i in range(MAX_METRICS)]
    assert decoded.cpu_pct == 0 and decoded.rss_mb == 20
    assert decoded.errors[-1].collector == "contract"
    assert "cpu_pct inf out of range" in decoded.errors[-1].message
    assert "39 metrics dropped" in decoded.errors[-1].message
    within = worker("b", metrics={"plugin.x": 1.5, "plugin.y": -2}, gpu_indices=[0, 7])
    sent = encode(within)
    for _ in range(2):  # the second time through the known-keys fast path
        fit_worker(within)
        assert encode(within) == sent


def test_a_hive_cuts_a_drivers_device_record_to_the_bounds():
    device = gpu(0, total_gib=80, used_gib=1)
    device.name = "n" * 1000
    device.util_pct, device.power_w, device.vram_free_mb = float("nan"), float("inf"), -1.0
    device.health = Degraded(reason="r" * 10_000)
    fit_gpu(device)
    (decoded,) = decode_heartbeat(encode(heartbeat("hive-a", [], [device]))).capabilities
    assert len(decoded.name) == SHORT_TEXT_CHARS and len(decoded.health.reason) == LONG_TEXT_CHARS
    assert (decoded.util_pct, decoded.power_w, decoded.vram_free_mb) == (None, None, 0)
    assert decoded.errors[-1].collector == "contract"


def test_a_worker_log_that_cannot_be_opened_is_a_spawn_error(none_monitor, tmp_path):
    missing = tmp_path / "absent" / "llm-a.log"
    with pytest.raises(SpawnError, match=f"cannot open the worker's log file {missing}"):
        none_monitor.spawn("llm", "a", sleeper(), log_path=str(missing))
    assert none_monitor.workers() == []


# -- memory: a heartbeat costs a small multiple of its body -------------------------------------

def _kept_bytes(body: bytes) -> int:
    registry = HiveRegistry()
    gc.collect()
    tracemalloc.start()
    try:
        registry.update_hive(decode_heartbeat(body))
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _dense_metrics_heartbeat(workers: int) -> bytes:
    """The densest shape the bounds allow: every worker with all its metrics, shortest keys."""
    data = json.loads(encode(fleet_heartbeat("hive-dense", workers)))
    for record in data["workers"]:
        record["metrics"] = {str(i): 0 for i in range(MAX_METRICS)}
    return json.dumps(data, separators=(",", ":")).encode()


@pytest.mark.parametrize("body, multiple", [
    (encode(fleet_heartbeat("hive-a", 100)), 4),
    (encode(fleet_heartbeat("hive-a", 1024)), 4),
    (_dense_metrics_heartbeat(1024), 10),
], ids=["100-workers", "1024-workers", "1024-workers-dense-metrics"])
def test_a_heartbeat_costs_the_queen_a_small_multiple_of_its_body(body, multiple):
    kept = _kept_bytes(body)
    assert kept <= multiple * len(body), f"{kept / len(body):.1f}x of {len(body)} bytes"


def test_a_refused_heartbeat_costs_nothing_after_it_is_refused():
    data = json.loads(encode(fleet_heartbeat("hive-a", 1)))
    data["workers"][0]["metrics"] = {f"m{i}": 0 for i in range(300_000)}  # the issue's attack
    body = json.dumps(data).encode()
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(ContractError, match="metrics"):
            decode_heartbeat(body)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < 64 * 1024


# -- the connection after an early error --------------------------------------------------------

async def test_an_error_before_the_body_is_read_closes_the_connection(queen, client):
    """A 413 decided from Content-Length: the queen says ``Connection: close`` and closes, so the
    client's next request goes on a fresh connection and is answered, every round. A body of up
    to 16 MiB is read and dropped first, so a client that reads no answer before it has sent
    everything (httpx) gets the 413 instead of a blocked send; a larger one is not waited for."""
    too_big = encode(fleet_heartbeat("hive-a", 400))  # > 64 KiB
    for body in (too_big, b"x" * (4 * 2**20)):
        refused = await client.post("/v1/hive-heartbeat", content=body)
        assert refused.status_code == 413 and refused.headers["connection"] == "close"
    for _ in range(20):
        refused = await client.post("/v1/hive-heartbeat", content=too_big)
        assert refused.status_code == 413 and refused.headers["connection"] == "close"
        await post_heartbeat(client, queen, heartbeat("hive-a"))
    host, port = url_of(queen).removeprefix("http://").rsplit(":", 1)

    def early_413() -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/hive-heartbeat HTTP/1.1\r\nHost: q\r\n"
                         b"Content-Length: 1000000000\r\n\r\n" + b"x" * 1000)
            reply = b""
            while chunk := sock.recv(65536):  # ends: the queen closed the connection
                reply += chunk
            return reply

    reply = await trio.to_thread.run_sync(early_413)
    assert reply.startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close\r\n" in reply


# -- logs: quoted, rate-limited ------------------------------------------------------------------

def test_rate_limited_log_lets_a_burst_through_then_counts(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("rbee.test"), burst=3, window_s=10,
                             clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="rbee.test"):
        for i in range(50):
            limited.warning("bad client %d", i)
        now[0] = 10.0
        limited.warning("later")
    assert [r.getMessage() for r in caplog.records] == [
        "bad client 0", "bad client 1", "bad client 2",
        "47 more like it in the last 10s not logged", "later"]


async def test_refused_requests_are_logged_quoted_and_rate_limited(queen, client, caplog):
    with caplog.at_level(logging.WARNING, logger="rbee.http.clients"):
        for _ in range(40):
            response = await client.get("/v1/hives/gpu%0A2026-11-27 INFO forged")
            assert response.status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "rbee.http.clients"]
    assert 1 <= len(lines) <= 10  # 40 refused, the first 10 logged
    assert all("\n" not in line and "2026-11-27 INFO forged" in line for line in lines)


# -- terminal output -----------------------------------------------------------------------------

HOSTILE_TEXT = "\x1b[2J\x1b[31mred\x07\u202e"


def test_every_table_cell_is_escaped():
    view = FleetView()
    record = worker("a", model=HOSTILE_TEXT)
    record.errors = [CollectorIssue(collector="gpu", message="down\r\n\x1b[1A")]
    view.apply(HiveTelemetryEvent(hive_id="hive-a", timestamp=utc_now(), workers=[record]))
    rendered = view.render()
    assert all(printable(line) == line for line in rendered.splitlines())
    assert "  \\x1b[2J\\x1b[3…  " in rendered  # the model, cut to its column's width
    assert "gpu: down\\r\\n\\x1b[1A" in rendered


async def test_rbee_workers_escapes_what_hives_sent(queen, client):
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a", model=HOSTILE_TEXT)]))
    result = await trio.to_thread.run_sync(lambda: rbee("workers", "--queen", url_of(queen)))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b[2J" in result.stdout
