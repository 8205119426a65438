"""The queen's HTTP API on a real server (127.0.0.1, port 0), and the ``rbee-queen`` process.

Bad input of every kind gets a 4xx JSON error naming the problem and leaves the registry as it
was; scheduling queries answer over HTTP what the registry answers in-process.
"""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from rbee.contract import (
    Degraded,
    EngineState,
    GpuFault,
    GpuFaultKind,
    OperationalStatus,
    Unhealthy,
    WorkerGpuUse,
    encode,
)

from .builders import GIB, gpu, heartbeat, worker
from .daemons import Daemon
from .queenkit import open_stream, post_heartbeat, start_queen, url_of

RBEE_QUEEN = str(Path(sys.executable).with_name("rbee-queen"))


@pytest.fixture
async def queen(nursery):
    return await start_queen(nursery, http={"max_body_bytes": 64 * 1024},
                             stream={"queen_interval_s": 3600, "keepalive_s": 3600})


@pytest.fixture
async def client(queen):
    async with httpx.AsyncClient(base_url=url_of(queen),
                                 timeout=httpx.Timeout(5.0, read=None)) as client:
        yield client


async def test_heartbeat_is_stored_and_acknowledged(queen, client):
    sent = heartbeat("hive-a", [worker("a", model="qwen")], [gpu(0, total_gib=80, used_gib=1)])
    response = await client.post("/v1/hive-heartbeat", content=encode(sent))
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok", "message": "heartbeat from hive 'hive-a' with 1 workers received"}
    stored = queen.registry.get_hive("hive-a")
    assert stored.workers == sent.workers and stored.capabilities == sent.capabilities


BAD_HEARTBEATS = [
    (b"{", "invalid heartbeat: Input data was truncated"),
    (b"", "invalid heartbeat: Input data was truncated"),
    (b"[1, 2]", "Expected `object`, got `array`"),
    (b'{"timestamp": "2026-01-01T00:00:00Z", "workers": []}', "missing required field `hive`"),
    (None, "Expected `str` of length >= 1 - at `$.hive.id`"),
    (None, "Expected `float`, got `str` - at `$.workers[0].cpu_pct`"),
    (None, "Expected `int` >= 0 - at `$.workers[0].pid`"),
    (None, "Expected `datetime` with a timezone component - at `$.timestamp`"),
]


def _corrupt(case: int) -> bytes:
    """Real heartbeats with one field made wrong, as JSON."""
    body = encode(heartbeat("hive-b", [worker("a")])).decode()
    if case == 4:
        return body.replace('"id":"hive-b"', '"id":""').encode()
    if case == 5:
        return body.replace('"cpu_pct":12.5', '"cpu_pct":"fast"').encode()
    if case == 6:
        return body.replace('"pid":4242', '"pid":-1').encode()
    return body.replace("Z\"", "\"", 1).encode()


@pytest.mark.parametrize("case", range(len(BAD_HEARTBEATS)))
async def test_bad_heartbeat_is_refused_and_registry_untouched(queen, client, case):
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("kept")]))
    body, expected = BAD_HEARTBEATS[case]
    response = await client.post("/v1/hive-heartbeat",
                                 content=_corrupt(case) if body is None else body)
    assert response.status_code == 400
    assert response.json()["status"] == "error"
    assert expected in response.json()["message"]
    assert queen.registry.hive_ids() == ["hive-a"]
    assert [w.instance for w in queen.registry.get_workers("hive-a")] == ["kept"]


async def test_oversized_heartbeat_is_refused_before_reading(queen, client):
    huge = heartbeat("hive-a", [worker(f"w{i}") for i in range(1000)])  # ~200 KB > 64 KiB
    response = await client.post("/v1/hive-heartbeat", content=encode(huge))
    assert response.status_code == 413
    assert "exceeds max_body_bytes (65536)" in response.json()["message"]
    assert len(queen.registry) == 0


async def test_oversized_chunked_heartbeat_is_refused(queen):
    """No Content-Length: the limit is enforced while reading, and the 413 comes before the body
    ends. (A raw socket, because httpx reads no response before it has sent the whole body.)"""
    host, port = url_of(queen).removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    await sock.send(b"POST /v1/hive-heartbeat HTTP/1.1\r\nHost: queen\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")

    async def send_forever() -> None:
        while True:
            await sock.send(b"1000\r\n" + b" " * 4096 + b"\r\n")

    reply = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_forever)
        with trio.fail_after(5):
            while b"}" not in reply:
                reply += await sock.recv(65536)
        nursery.cancel_scope.cancel()
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert reply.endswith(b'{"status":"error","message":"body exceeds max_body_bytes (65536)"}')
    assert len(queen.registry) == 0


async def test_gzip_heartbeat_is_accepted(queen, client):
    sent = heartbeat("hive-z", [worker(f"w{i}") for i in range(50)])
    response = await client.post("/v1/hive-heartbeat", content=gzip.compress(encode(sent)),
                                 headers={"content-encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert queen.registry.get_workers("hive-z") == sent.workers


@pytest.mark.parametrize("body, encoding, status, message", [
    (gzip.compress(b" " * (10 * 2**20), mtime=0), "gzip", 413,
     "decompressed body exceeds max_body_bytes (65536)"),  # 10 KiB that inflate to 10 MiB
    (b"not gzip at all", "gzip", 400, "invalid gzip body"),
    (gzip.compress(b"{}", mtime=0)[:-6], "gzip", 400, "invalid gzip body: truncated"),
    (b"{}", "br", 415, "unsupported Content-Encoding 'br'"),
])
async def test_bad_encoded_heartbeat_is_refused(queen, client, body, encoding, status, message):
    response = await client.post("/v1/hive-heartbeat", content=body,
                                 headers={"content-encoding": encoding})
    assert response.status_code == status
    assert message in response.json()["message"]
    assert len(queen.registry) == 0


async def test_health(queen, client):
    await post_heartbeat(client, queen, heartbeat("hive-a"))
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        health = (await client.get("/health")).json()
    assert health == {"status": "ok", "version": health["version"], "hives": 1,
                      "stream_clients": 1}


async def test_hives_listing_and_unknown_hive(queen, client):
    await post_heartbeat(client, queen, heartbeat("hive-b", [worker("x")]))
    await post_heartbeat(client, queen, heartbeat("hive-a"))
    listed = (await client.get("/v1/hives")).json()
    assert [(h["hive"]["id"], h["stale"], len(h["workers"])) for h in listed] == [
        ("hive-a", False, 0), ("hive-b", False, 1)]
    assert (await client.get("/v1/hives/hive-b")).json()["workers"][0]["instance"] == "x"
    missing = await client.get("/v1/hives/ghost")
    assert missing.status_code == 404
    assert missing.json() == {"status": "error", "message": "unknown hive 'ghost'"}


async def test_delete_hive_removes_it_and_announces_it(queen, client):
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        response = await client.delete("/v1/hives/hive-a")
        removed = await stream.next("hive_removed")
    assert response.json()["message"] == "hive 'hive-a' and 1 workers removed"
    assert (removed.hive_id, removed.reason, removed.worker_ids) == (
        "hive-a", "removed by request", ["hive-a/llm/a"])
    assert (await client.delete("/v1/hives/hive-a")).status_code == 404


async def test_workers_scheduling_queries_over_http(queen, client):
    await post_heartbeat(client, queen, heartbeat(
        "hive-a",
        [worker("idle-llama", model="llama", gpu_indices=[0], vram_mb=10 * GIB),
         worker("busy-llama", model="llama", gpu_util_pct=95.0, gpu_indices=[1],
                vram_mb=70 * GIB),
         worker("idle-qwen", model="qwen", gpu_indices=[1], vram_mb=5 * GIB)],
        [gpu(0, total_gib=80, used_gib=10), gpu(1, total_gib=80, used_gib=75)]))

    async def ids(params: dict) -> list[str]:
        response = await client.get("/v1/workers", params=params)
        assert response.status_code == 200, response.text
        return [w["worker"]["instance"] for w in response.json()]

    assert await ids({}) == ["busy-llama", "idle-llama", "idle-qwen"]  # worker id order
    assert await ids({"idle": "true"}) == ["idle-llama", "idle-qwen"]
    assert await ids({"model": "llama"}) == ["busy-llama", "idle-llama"]
    assert await ids({"min_free_vram_mb": 20 * 1024}) == ["idle-llama"]
    assert await ids({"idle": "1", "model": "qwen", "min_free_vram_mb": 1024}) == ["idle-qwen"]
    assert await ids({"idle": "true", "model": "qwen", "min_free_vram_mb": 8 * 1024}) == []
    (listed,) = (await client.get("/v1/workers", params={"model": "qwen"})).json()
    assert listed["vram"] == {"gpu_indices": [1], "total_mb": 80 * GIB, "free_mb": 5 * GIB,
                              "claimed_mb": 75 * GIB, "measured": True}
    assert (listed["hive_id"], listed["schedulable"], listed["hive_stale"]) == (
        "hive-a", True, False)


async def test_gpu_health_and_mig_through_the_api(queen, client):
    """/v1/hives shows each GPU's health and MIG instances as the hive sent them; a worker on an
    unhealthy GPU is left out of scheduling queries and shows that GPU in the full listing."""
    sick = msgspec.structs.replace(
        gpu(0, total_gib=80, used_gib=10), faults=[GpuFault(
            kind=GpuFaultKind.REMAPPED_ROWS_PENDING, fatal=True,
            detail="rows wait to be remapped: reset the GPU")],
        health=Unhealthy(reason="remapped_rows_pending: rows wait to be remapped: reset the GPU"))
    mig = msgspec.structs.replace(gpu(1, total_gib=20, used_gib=5), uuid="MIG-7", util_pct=None,
                                  mig_parent_uuid="GPU-00000001", mig_instance_id=2)
    await post_heartbeat(client, queen, heartbeat(
        "hive-a", [worker("on-sick", gpu_indices=[0], gpus=[WorkerGpuUse(
                       index=0, uuid="GPU-00000000", vram_mb=10 * GIB, util_pct=0.0)]),
                   worker("on-mig", gpu_indices=[1], gpu_util_pct=None, gpus=[WorkerGpuUse(
                       index=1, uuid="MIG-7", vram_mb=5 * GIB, util_pct=None)])],
        [sick, mig], health=Degraded(reason="GPU 0 (GPU-00000000) unhealthy: remapped rows")))
    hive = (await client.get("/v1/hives/hive-a")).json()
    assert hive["hive"]["health_status"]["status"] == "degraded"
    gpus = {g["uuid"]: g for g in hive["capabilities"]}
    assert gpus["GPU-00000000"]["health"] == {
        "status": "unhealthy", "reason": "remapped_rows_pending: rows wait to be remapped: reset the GPU"}
    assert gpus["GPU-00000000"]["faults"][0]["kind"] == "remapped_rows_pending"
    assert (gpus["MIG-7"]["mig_parent_uuid"], gpus["MIG-7"]["util_pct"]) == ("GPU-00000001", None)
    listed = {w["worker"]["instance"]: w for w in (await client.get("/v1/workers")).json()}
    assert (listed["on-sick"]["schedulable"], listed["on-sick"]["unhealthy_gpus"]) == (
        False, ["GPU-00000000"])
    schedulable = (await client.get("/v1/workers", params={"min_free_vram_mb": 0})).json()
    assert [w["worker"]["instance"] for w in schedulable] == ["on-mig"]
    assert schedulable[0]["vram"]["free_mb"] == 15 * GIB  # the MIG instance's, not its parent's
    idle = (await client.get("/v1/workers", params={"idle": "true"})).json()
    assert idle == []  # on-mig's utilisation is unknown: never idle


@pytest.mark.parametrize("params, expected", [
    ({"min_free_vram_mb": "lots"}, "'min_free_vram_mb' must be a number, not 'lots'"),
    ({"min_free_vram_mb": "-1"}, "'min_free_vram_mb' must be >= 0, not '-1'"),
    ({"min_free_vram_mb": "nan"}, "'min_free_vram_mb' must be >= 0, not 'nan'"),
    ({"idle": "maybe"}, "'idle' must be true or false, not 'maybe'"),
    ({"gpu": "1"}, "unknown query parameter(s): gpu"),
    ({"max_waiting": "1.5"}, "'max_waiting' must be a whole number, not '1.5'"),
    ({"max_waiting": "-1"}, "'max_waiting' must be >= 0, not '-1'"),
    ({"max_kv_cache_pct": "full"}, "'max_kv_cache_pct' must be a number, not 'full'"),
])
async def test_workers_query_bad_parameters(client, params, expected):
    response = await client.get("/v1/workers", params=params)
    assert response.status_code == 400
    assert expected in response.json()["message"]


async def test_workers_engine_queries_over_http(queen, client):
    """A vLLM worker at 60 % GPU with its queue full is not idle; one at 95 % GPU with no request
    is; the engine filters leave out workers whose engine is unknown."""
    await post_heartbeat(client, queen, heartbeat("hive-a", [
        worker("queuing", gpu_util_pct=60.0, engine=EngineState(
            engine="vllm", requests_running=12, requests_waiting=7, kv_cache_pct=94.0)),
        worker("drained", gpu_util_pct=95.0, engine=EngineState(
            engine="vllm", requests_running=0, requests_waiting=0, kv_cache_pct=3.0)),
        worker("serving", engine=EngineState(engine="llamacpp", requests_running=1,
                                             requests_waiting=0)),
        worker("no-engine", gpu_util_pct=1.0)]))

    async def ids(params: dict) -> list[str]:
        response = await client.get("/v1/workers", params=params)
        assert response.status_code == 200, response.text
        return [w["worker"]["instance"] for w in response.json()]

    assert await ids({"idle": "true"}) == ["drained", "no-engine"]
    assert await ids({"max_waiting": "0"}) == ["drained", "serving"]
    assert await ids({"max_waiting": "7"}) == ["drained", "queuing", "serving"]
    assert await ids({"max_kv_cache_pct": "50"}) == ["drained"]
    assert await ids({"max_kv_cache_pct": "100", "max_waiting": "3"}) == ["drained"]
    listed = (await client.get("/v1/workers", params={"max_waiting": "0"})).json()
    assert listed[0]["worker"]["engine"] == {"engine": "vllm", "requests_running": 0,
                                             "requests_waiting": 0, "kv_cache_pct": 3.0}


async def test_unknown_path_and_wrong_method_are_json_errors(client):
    missing = await client.get("/v1/nothing")
    assert (missing.status_code, missing.json()["message"]) == (404, "GET /v1/nothing: not found")
    wrong = await client.get("/v1/hive-heartbeat")
    assert wrong.status_code == 405
    assert wrong.json()["message"] == "GET /v1/hive-heartbeat: method not allowed"


# -- the rbee-queen process ---------------------------------------------------------------


def run_queen(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([RBEE_QUEEN, *args], capture_output=True, text=True, timeout=timeout)


def test_rbee_queen_check_config(tmp_path):
    good = tmp_path / "queen.yaml"
    good.write_text("port: 9000\nregistry: {stale_after_s: 3, remove_after_s: 30}\n")
    result = run_queen("--config", str(good), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "127.0.0.1:9000" in result.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("registry: {stale_after_s: soon}\n")
    result = run_queen("--config", str(bad), "--check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"rbee-queen: {bad}: registry.stale_after_s: "
                                     "Expected `float`, got `str`")

    missing = tmp_path / "absent-token"
    bad.write_text(f"auth_token_file: {missing}\n")
    result = run_queen("--config", str(bad), "--check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"rbee-queen: {bad}: auth_token_file: cannot read token "
                                     f"file {missing}: No such file or directory")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_rbee_queen_stops_cleanly_on_signal_with_a_stream_client(tmp_path, stop):
    with Daemon("rbee-queen", tmp_path / "queen.yaml", "port: 0\n") as queen:
        async with httpx.AsyncClient(base_url=queen.url, timeout=httpx.Timeout(5.0, read=None)
                                     ) as client:
            response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat("h")))
            assert response.status_code == 200
            async with client.stream("GET", "/v1/heartbeats/stream") as stream:
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("id: ")
                queen.process.send_signal(stop)
                with trio.fail_after(5):  # the stream ends: the queen closed it
                    rest = [line async for line in lines]
        assert len(rest) < 10
        assert await queen.wait_exit(5) == 0, queen.stderr()


def test_rbee_queen_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "queen.yaml"
        config.write_text(f"port: {port}\n")
        result = run_queen("--config", str(config))
    assert result.returncode == 1
    assert f"rbee-queen: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


async def test_a_stopping_hive_says_goodbye(queen, client):
    """A heartbeat with status ``stopped`` is a hive's last: it leaves the registry at once and
    the stream announces it, without waiting for the silence timeout."""
    await post_heartbeat(client, queen, heartbeat("hive-a", [worker("a")]))
    async with open_stream(client, queen) as stream:
        await stream.next("snapshot")
        response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat(
            "hive-a", [], status=OperationalStatus.STOPPED)))
        removed = await stream.next("hive_removed")
    assert response.json()["message"] == "hive 'hive-a' stopped: removed"
    assert (removed.reason, removed.worker_ids) == ("the hive stopped", ["hive-a/llm/a"])
    assert len(queen.registry) == 0
