"""The whole pipeline with real processes: ``rbee-queen`` and ``rbee-hive`` started from YAML
configs, real workers in real cgroups, a real SSE client on the queen's stream. The seed's 9
end-to-end tests keep their names. Intervals and thresholds are set low so the suite stays fast.

The GPU is faked only where a test needs one: an ``nvidia-smi`` script on the hive's PATH (this
machine has no GPU).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
import yaml

from rbee.contract import HiveRemovedEvent, HiveTelemetryEvent, WorkerState, utc_now
from rbee.http.auth import bearer

from .conftest import IS_ROOT, RUN_ROOT, V1_MOUNTS, sleeper
from .daemons import BIN, Daemon
from .fakes import processes_left, write_fake_nvidia_smi
from .queenkit import free_port, open_stream, small_window_client

QUEEN = ("port: {port}\n"
         "registry: {{stale_after_s: {stale}, remove_after_s: {remove}, cleanup_interval_s: 0.1}}\n"
         "stream: {{queen_interval_s: 0.5, client_buffer: {buffer}}}\n")
INTERVAL = 0.25


def queen_config(port: int = 0, buffer: int = 256, stale: float = 1.0) -> str:
    return QUEEN.format(port=port, buffer=buffer, stale=stale, remove=3 * stale)


def demo_worker(instance: str, model: str, **fields) -> dict:
    return {"group": "llm", "instance": instance, "argv": [
        sys.executable, "-m", "rbee.demo.worker", "--model", model, "--load", "0.05"], **fields}


def hive_config(tag: str, queen_url: str, workers: list[dict] = (), **extra) -> str:
    data: dict = {
        "id": f"e2e-{tag}", "port": 0, "queen_url": queen_url, "stop_workers_on_exit": True,
        "cgroup": {"root": f"{RUN_ROOT}/e2e-{tag}"}, "collect": {"gpu": "none"},
        "heartbeat": {"interval_s": INTERVAL, "backoff_initial_s": 0.05,
                      "backoff_max_s": INTERVAL, "reconnect_initial_s": 0.05,
                      "reconnect_max_s": INTERVAL, "reminder_interval_s": 60},
        "workers": list(workers),
    }
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return yaml.safe_dump(data)


def hive(tmp_path, tag: str, queen_url: str, workers: list[dict] = (), env=None,
         **extra) -> Daemon:
    return Daemon("rbee-hive", tmp_path / f"hive-{tag}.yaml",
                  hive_config(tag, queen_url, workers, **extra), env=env,
                  cgroup_root=f"{RUN_ROOT}/e2e-{tag}")


def queen(tmp_path, port: int = 0, buffer: int = 256, stale: float = 1.0, **extra) -> Daemon:
    text = queen_config(port, buffer, stale) + (yaml.safe_dump(extra) if extra else "")
    return Daemon("rbee-queen", tmp_path / "queen.yaml", text)


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
        yield client


async def queen_workers(client: httpx.AsyncClient, queen_url: str, **params) -> list[dict]:
    response = await client.get(f"{queen_url}/v1/workers", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def until_queen_lists(client, queen_url: str, count: int, timeout: float = 10.0) -> list:
    with trio.fail_after(timeout):
        while len(listed := await queen_workers(client, queen_url)) != count:
            await trio.sleep(0.05)
    return listed


def pids_in(event, hive_id: str) -> set[int]:
    if isinstance(event, HiveTelemetryEvent) and event.hive_id == hive_id:
        return {w.pid for w in event.workers}
    return set()


async def test_end_to_end_telemetry_flow(tmp_path, client):
    """Spawn through the hive's API → collection in its cgroup → heartbeat → registry → SSE."""
    with queen(tmp_path) as q, hive(tmp_path, "flow", q.url) as h:
        async with open_stream(client, q.url) as stream:
            await stream.next("snapshot")
            response = await client.post(f"{h.url}/v1/workers", json=demo_worker(
                "a", "qwen-7b", cpu_limit="50%", memory_limit="256M"))
            assert response.status_code == 201, response.text
            pid = int(response.json()["message"].rsplit("pid ", 1)[1].rstrip(")"))
            event = await stream.until(lambda e: any(
                w.pid == pid and w.rate_window_s > 0 for w in getattr(e, "workers", [])),
                timeout=10)
        (worker,) = event.workers
        assert (event.hive_id, worker.group, worker.instance, worker.model) == (
            "e2e-flow", "llm", "a", "qwen-7b")
        assert worker.cpu_limit_pct == 50.0 and worker.memory_limit_mb == 256.0
        assert worker.rss_mb > 0 and worker.cpu_pct > 0
        (listed,) = await queen_workers(client, q.url)
        assert (listed["hive_id"], listed["worker"]["pid"]) == ("e2e-flow", pid)


async def test_worker_dies_removed_from_registry(tmp_path, client):
    """A worker that dies leaves the schedulable fleet at once (its hive pushes the exit), stays
    listed as ``exited`` with how it ended (issue 22 item 4: failures never vanish), and is
    removed from the registry once deleted (answered 200, not 404)."""
    with queen(tmp_path) as q, hive(tmp_path, "dies", q.url, [
            demo_worker("victim", "m", restart="never"), demo_worker("other", "m")]) as h:
        with trio.fail_after(10):  # both up (``running``: measured over a rate window)
            while not all(w["schedulable"] for w in await until_queen_lists(client, q.url, 2)):
                await trio.sleep(0.05)
        listed = await queen_workers(client, q.url)
        victim = next(w["worker"]["pid"] for w in listed if w["worker"]["instance"] == "victim")

        def victim_ended(event) -> bool:
            return any(w.instance == "victim" and w.state is WorkerState.EXITED
                       for w in getattr(event, "workers", ()))

        async with open_stream(client, q.url) as stream:
            await stream.next("snapshot")
            os.kill(victim, signal.SIGKILL)
            event = await stream.until(victim_ended, timeout=5)
            ended = next(w for w in event.workers if w.instance == "victim")
            assert (ended.pid, ended.last_exit.signal) == (victim, "SIGKILL")
            found = {w["worker"]["instance"]: (w["worker"].get("state", "running"), w["schedulable"])
                     for w in await queen_workers(client, q.url)}
            assert found["victim"] == ("exited", False) and found["other"][1] is True
            assert [w["worker"]["instance"] for w in await queen_workers(client, q.url, model="m")
                    ] == ["other"]
            assert (await client.delete(f"{h.url}/v1/workers/llm/victim")).status_code == 200
            event = await stream.until(lambda e: bool(pids_in(e, "e2e-dies"))
                                       and victim not in pids_in(e, "e2e-dies"), timeout=5)
        assert [w.instance for w in event.workers] == ["other"]
        assert [w["worker"]["instance"] for w in await queen_workers(client, q.url)] == ["other"]
        assert h.process.poll() is None


def token_file(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.write_text(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return str(path)


async def until_health(client, url: str, predicate, timeout: float = 10.0) -> dict:
    with trio.fail_after(timeout):
        while not predicate(health := (await client.get(f"{url}/health")).json()):
            await trio.sleep(0.05)
    return health


async def test_shared_token_admits_only_hives_that_carry_it(tmp_path, client):
    """auth_token_file on both sides: the hive with the queen's token is listed, one with another
    token is refused (and says why in its /health), and the writes of both APIs need it."""
    shared, other = token_file(tmp_path, "token"), token_file(tmp_path, "other-token")
    with queen(tmp_path, auth_token_file=shared) as q, \
            hive(tmp_path, "token", q.url, [demo_worker("a", "m")], auth_token_file=shared) as h, \
            hive(tmp_path, "intruder", q.url, [demo_worker("b", "m")],
                 auth_token_file=other) as intruder:
        await until_queen_lists(client, q.url, 1)
        refused = await until_health(client, intruder.url,
                                     lambda health: health["queen"]["last_problem"])
        assert refused["queen"]["delivered"] == 0
        assert refused["queen"]["last_problem"].startswith(
            "HTTP 401: POST /v1/hive-heartbeat: wrong token")
        hives = (await client.get(f"{q.url}/v1/hives")).json()  # reads stay open
        assert [hive["hive"]["id"] for hive in hives] == ["e2e-token"]

        spawn = demo_worker("c", "m")
        response = await client.post(f"{h.url}/v1/workers", json=spawn)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "needs the shared token" in response.json()["message"]
        token = Path(shared).read_text().strip()
        response = await client.post(f"{h.url}/v1/workers", json=spawn, headers=bearer(token))
        assert response.status_code == 201, response.text
        await until_queen_lists(client, q.url, 2)

        response = await client.delete(f"{q.url}/v1/hives/e2e-token")
        assert response.status_code == 401
        assert len(await queen_workers(client, q.url)) == 2


def rbee_workers(queen_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rbee"), "workers", "--queen", queen_url, *args],
                          capture_output=True, text=True, timeout=30)


async def test_scheduling_queries(tmp_path, client):
    """Two hives, one with two GPUs (an 80 GB A100 and a 96 GB H100, from a fake nvidia-smi):
    ``rbee workers`` answers idle / model / free-VRAM queries from the real devices' figures.
    nvidia-smi has no per-process utilisation, so a worker with a process on a GPU gets that
    GPU's figure (marked ``device``); one with none on it uses none of it."""
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    write_fake_nvidia_smi(bin_dir)
    gpu_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with queen(tmp_path) as q, \
            hive(tmp_path, "cpu", q.url, [demo_worker("bge", "bge-small")]), \
            hive(tmp_path, "gpu", q.url, [
                demo_worker("llama", "llama-3-8b", env={"CUDA_VISIBLE_DEVICES": "1"}),
                demo_worker("qwen", "qwen-7b", env={"CUDA_VISIBLE_DEVICES": "0"})],
                env=gpu_env, collect={"gpu": "nvidia-smi"}):
        with trio.fail_after(10):  # all three up (running: schedulable), the GPU ones measured
            while len(await queen_workers(client, q.url, min_free_vram_mb=0)) < 2 or [
                    w["schedulable"] for w in await queen_workers(client, q.url)] != [True] * 3:
                await trio.sleep(0.05)

        def instances(*args: str) -> list[str]:
            result = rbee_workers(q.url, "--json", *args)
            assert result.returncode == 0, result.stderr
            return sorted(w["worker"]["instance"] for w in json.loads(result.stdout))

        assert instances() == ["bge", "llama", "qwen"]
        assert instances("--model", "llama-3-8b") == ["llama"]
        # no process on any GPU yet; bge runs on no GPU and has no engine, so nothing says it is
        # idle (before, its GPU figure read 0 and it counted as GPU-idle)
        assert instances("--idle") == ["llama", "qwen"]
        [bge] = [w for w in await queen_workers(client, q.url) if w["worker"]["instance"] == "bge"]
        assert bge["worker"]["gpu_util_pct"] is None and not bge["idle"]
        [llama] = [w for w in await queen_workers(client, q.url) if w["worker"]["instance"] == "llama"]
        write_fake_nvidia_smi(bin_dir, apps=[(llama["worker"]["pid"], 1, 20000)])
        with trio.fail_after(10):
            while not [w for w in await queen_workers(client, q.url)
                       if w["worker"]["vram_mb"] == 20000]:
                await trio.sleep(0.05)
        assert instances("--idle") == ["qwen"]  # llama is on the H100, 37% busy
        [llama] = [w for w in await queen_workers(client, q.url) if w["worker"]["instance"] == "llama"]
        assert (llama["worker"]["gpu_util_pct"], llama["worker"]["gpu_util_source"]) == (37.0, "device")
        assert instances("--min-free-vram", "78000") == ["qwen"]  # A100: 80535 MiB free
        assert instances("--min-free-vram", "77000") == ["llama", "qwen"]  # H100: 77391
        assert instances("--min-free-vram", "90000") == []
        table = rbee_workers(q.url, "--min-free-vram", "78000")
        assert "e2e-gpu" in table.stdout and "VRAM free 80535 MiB" in table.stdout
        bad = rbee_workers(q.url, "--min-free-vram", "-5")
        assert bad.returncode == 1 and "'min_free_vram_mb' must be >= 0" in bad.stderr




async def test_queen_restart_recovers(tmp_path, client):
    """The queen restarts with an empty registry; the hives fill it again within two heartbeat
    intervals of it listening (plus process start-up slack)."""
    port = free_port()
    with queen(tmp_path, port=port) as q, hive(tmp_path, "restart", q.url,
                                               [demo_worker("a", "m"), demo_worker("b", "m")]):
        await until_queen_lists(client, q.url, 2)
        assert q.stop() == 0
        with queen(tmp_path, port=port) as again:
            with trio.fail_after(2 * INTERVAL + 1.0):
                await until_queen_lists(client, again.url, 2)


async def test_hive_restart_clears_workers(tmp_path, client):
    """A hive that stops (stopping its workers) says goodbye: the queen drops it and its workers
    at once and announces it; nothing of the workers is left."""
    with queen(tmp_path) as q, hive(tmp_path, "stops", q.url,
                                    [demo_worker("a", "m"), demo_worker("b", "m")]) as h:
        listed = await until_queen_lists(client, q.url, 2)
        pids = [w["worker"]["pid"] for w in listed]
        async with open_stream(client, q.url) as stream:
            await stream.next("snapshot")
            h.process.send_signal(signal.SIGTERM)
            removed = await stream.next("hive_removed", timeout=10)
        assert isinstance(removed, HiveRemovedEvent)
        assert (removed.hive_id, removed.reason) == ("e2e-stops", "the hive stopped")
        assert sorted(removed.worker_ids) == ["e2e-stops/llm/a", "e2e-stops/llm/b"]
        assert await h.wait_exit() == 0
        assert await queen_workers(client, q.url) == []
        assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []


async def test_hive_restart_readopts_workers(tmp_path, client):
    """With stop_workers_on_exit false (the default), a restarted hive re-adopts its running
    workers from the cgroup tree: same PIDs, reported again, not started twice. The queen lists
    them all along: the stopping hive does not say goodbye, as its workers run on. The queen
    waits 5 s before calling a hive stale: a hive restart (a new Python process) can take more
    than a second on a busy machine, and a restart is what this test is about, not silence."""
    with queen(tmp_path, stale=5.0) as q:
        workers = [demo_worker("a", "m"), demo_worker("b", "m")]
        async with open_stream(client, q.url) as stream:
            with hive(tmp_path, "readopt", q.url, workers, stop_workers_on_exit=False) as first:
                before = sorted(w["worker"]["pid"]
                                for w in await until_queen_lists(client, q.url, 2))
                first.cgroup_root = None  # its workers must outlive it
            assert first.process.returncode == 0
            assert sorted(w["worker"]["pid"] for w in await queen_workers(client, q.url)) == before
            restarted_at, seen = utc_now(), []

            def from_second_hive(event) -> bool:
                seen.append(type(event).__struct_config__.tag)
                return bool(pids_in(event, "e2e-readopt")) and event.timestamp > restarted_at

            with hive(tmp_path, "readopt", q.url, workers, stop_workers_on_exit=True) as second:
                event = await stream.until(from_second_hive, timeout=10)
                assert sorted(pids_in(event, "e2e-readopt")) == before
                assert "re-adopted worker llm/a" in second.stderr()
        assert "hive_removed" not in seen and "hive_stale" not in seen


async def test_queen_unreachable(tmp_path, client):
    """No queen: the hive runs on, collects and serves its API, and says so once in its log."""
    with hive(tmp_path, "alone", f"http://127.0.0.1:{free_port()}",
              [demo_worker("a", "m")]) as h:
        with trio.fail_after(10):
            while not any(w["rate_window_s"] > 0 for w in
                          (await client.get(f"{h.url}/v1/workers")).json()):
                await trio.sleep(0.05)
        health = (await client.get(f"{h.url}/health")).json()
        assert health["queen"]["reachable"] is False
        assert health["queen"]["last_problem"].startswith("ConnectError")
        assert health["queen"]["failed"] >= 1 and health["queen"]["delivered"] == 0
        assert health["operational_status"] == "ready"
        assert h.stderr().count("heartbeat not delivered") == 1


async def test_nvidia_smi_timeout(tmp_path, client):
    """An nvidia-smi that hangs (a fake on PATH): the hive is marked degraded, and its heartbeats
    keep arriving at the interval; no nvidia-smi is left behind."""
    bin_dir = tmp_path / "hang-bin"
    bin_dir.mkdir()
    write_fake_nvidia_smi(bin_dir, hang_s=30)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with queen(tmp_path) as q, hive(tmp_path, "hang", q.url, [demo_worker("a", "m")], env=env,
                                    collect={"gpu": "nvidia-smi", "nvidia_smi_timeout_s": 1.0,
                                             "refresh_timeout_s": 0.3}):
        async with open_stream(client, q.url) as stream:
            await stream.next("snapshot")
            received = 0
            with trio.move_on_after(2.0):
                while True:
                    received += bool(pids_in(await stream.next("hive_telemetry"), "e2e-hang"))
        assert received >= 4  # 2 s at a 0.25 s interval is 8
        (state,) = (await client.get(f"{q.url}/v1/hives")).json()
        assert state["hive"]["health_status"]["status"] == "degraded"
        assert "refresh" in state["hive"]["health_status"]["reason"]
    assert processes_left(str(bin_dir)) == []


UNPRIVILEGED_HIVE = """
import os, sys
import rbee.hive.main, rbee.hive.service, rbee.http.serving  # nobody cannot read root's Python install,
import hypercorn.trio.run, hypercorn.protocol.h11, hypercorn.protocol.http_stream  # so import
import hypercorn.trio.tcp_server, hypercorn.trio.lifespan, hypercorn.trio.task_group  # first
import httpx, httpcore, h11, anyio._backends._trio, starlette.routing, yaml, encodings.idna
from rbee.plugin.manager import build_plugin_manager
build_plugin_manager()  # loads the collectors through importlib.metadata
os.setgid(65534); os.setuid(65534)
sys.exit(rbee.hive.main.main(["--config", sys.argv[1], "--log-level", "WARNING"]))
"""


@contextmanager
def unprivileged_hive(config: str) -> Iterator[subprocess.Popen]:
    """rbee-hive as user nobody. It starts as root only to import (this machine's Python lives
    under /root, which nobody cannot read), then drops to nobody before reading its config, a
    world-readable file in /tmp removed afterwards."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir="/tmp") as file:
        file.write(config)
        file.flush()
        os.chmod(file.name, 0o644)
        process = subprocess.Popen([sys.executable, "-c", UNPRIVILEGED_HIVE, file.name],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd="/")
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=10)


@pytest.mark.skipif(not (IS_ROOT and "memory" in V1_MOUNTS),
                    reason="needs root (to run the hive as another user) and cgroup v1 mounted")
async def test_cgroup_permission_denied(client):
    """As an unprivileged user: an explicit cgroup backend it may not use is a clear error naming
    the path and the missing permission; "auto" falls back to plain processes and says the
    limits are not enforced."""
    with unprivileged_hive(hive_config("denied", "http://127.0.0.1:9",
                                       cgroup={"backend": "v1"})) as denied:
        _, stderr = denied.communicate(timeout=30)
    assert denied.returncode == 1, stderr
    assert "permission denied" in stderr and f"{RUN_ROOT}/e2e-denied" in stderr

    worker = {"group": "llm", "instance": "a", "argv": sleeper(),  # nobody cannot run our Python
              "cpu_limit": "50%", "memory_limit": "64M"}
    with unprivileged_hive(hive_config("fallback", "http://127.0.0.1:9", [worker],
                                       cgroup={"backend": "auto"})) as fallback:
        url = fallback.stdout.readline().split()[-1]
        with trio.fail_after(10):
            while not (workers := (await client.get(f"{url}/v1/workers")).json()):
                await trio.sleep(0.05)
        assert (await client.get(f"{url}/health")).json()["cgroup_backend"] == "none"
        assert workers[0]["limits_applied"] is False
    assert fallback.returncode == 0


async def test_broadcast_channel_full(tmp_path, client):
    """A stream client that stops reading falls behind its 2-event buffer; a reading client keeps
    getting every heartbeat meanwhile, and the slow one resumes with lagged + snapshot."""
    with queen(tmp_path, buffer=2) as q, hive(tmp_path, "slow", q.url, [
            demo_worker(f"w{i}", "m") for i in range(3)], heartbeat={"interval_s": 0.05}):
        async with small_window_client() as slow, open_stream(slow, q.url) as stalled:
            await stalled.next("snapshot")
            async with open_stream(client, q.url) as reader:
                await reader.next("snapshot")
                received = 0
                with trio.move_on_after(2.0):
                    while True:
                        received += bool(pids_in(await reader.next("hive_telemetry"),
                                                 "e2e-slow"))
            assert received >= 15  # 2 s at 0.05 s is 40
            lagged = await stalled.next("lagged", timeout=10)
            snapshot = await stalled.next(timeout=5)
        assert lagged.dropped > 0
        assert [h.hive.id for h in snapshot.hives] == ["e2e-slow"]


@pytest.mark.parametrize("queen_url, expected", [
    ("http://queen.example:7833", None),
    ("ftp://queen.example", "queen_url: 'ftp://queen.example': the scheme must be http or https"),
])
def test_rbee_hive_check_config(tmp_path, queen_url, expected):
    path = tmp_path / "hive.yaml"
    path.write_text(hive_config("check", queen_url))
    result = subprocess.run([str(BIN / "rbee-hive"), "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=30)
    if expected is None:
        assert result.returncode == 0, result.stderr
        assert "config OK" in result.stdout and "queen http://queen.example:7833" in result.stdout
    else:
        assert result.returncode == 2
        assert result.stderr.strip() == f"rbee-hive: {path}: {expected}"
