"""The heartbeat sender, from a real hive agent (real workers in real cgroups) to a real queen on
127.0.0.1. The seed's 10 heartbeat tests keep their names.

Where the queen must misbehave (answer 503 or 404, hang, be absent) the other side is a real
server too: a small Starlette app on hypercorn, a TCP listener that never answers, a closed port.
Only the interval test replaces the network, with httpx's MockTransport, because it runs under
trio's MockClock: virtual time and real sockets do not mix, and the schedule is the point there.
"""

from __future__ import annotations

import gzip
import itertools
import logging
from functools import partial

import httpx
import pytest
import trio
from starlette.requests import Request
from starlette.routing import Route
from trio.testing import MockClock

from rbee import ConfigError, decode_heartbeat
from rbee.config import HttpSettings, WorkerSpec
from rbee.contract import Reply, paths
from rbee.hive.heartbeat import HeartbeatSender
from rbee.http.app import JsonResponse, json_app
from rbee.http.serving import serve
from rbee.plugin import hookimpl

from .conftest import sleeper
from .hivekit import hive_config, sleeper_specs, start_hive
from .queenkit import free_port, start_queen, url_of, wait_until

FAST = {"interval_s": 0.2, "read_timeout_s": 0.5, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2}


class ScriptedQueen:
    """A real HTTP server standing in for a queen that misbehaves: it answers each heartbeat with
    the next status of ``statuses`` (the last one repeats) and keeps every body it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []

    async def _heartbeat(self, request: Request) -> JsonResponse:
        self.bodies.append(await request.body())
        self.headers.append(dict(request.headers))
        status = self.statuses[min(len(self.bodies), len(self.statuses)) - 1]
        return JsonResponse(Reply(status="ok" if status == 200 else "error",
                                  message="accepted" if status == 200 else "scripted failure"),
                            status_code=status)

    async def start(self, nursery: trio.Nursery) -> str:
        app = json_app([Route(paths.HEARTBEAT, self._heartbeat, methods=["POST"])])
        stop = trio.Event()
        urls = await nursery.start(lambda task_status: serve(
            app, "127.0.0.1", 0, HttpSettings(), shutdown_trigger=stop.wait,
            task_status=task_status))
        return urls[0]




async def test_send_heartbeat_posts_to_queen(nursery):
    queen = await start_queen(nursery)
    config = hive_config("posts", port=7999, heartbeat=FAST)
    await start_hive(nursery, config, url_of(queen))
    await wait_until(lambda: queen.registry.hive_ids() == ["hive-test"])
    hive = queen.registry.get_hive("hive-test").hive
    assert (hive.port, hive.operational_status) == (7999, "ready")


async def test_send_heartbeat_includes_workers(nursery):
    queen = await start_queen(nursery)
    agent, _ = await start_hive(nursery, hive_config("includes", heartbeat=FAST,
                                                     workers=sleeper_specs(2)), url_of(queen))
    pids = sorted(w.pid for w in agent.monitor.workers())
    await wait_until(lambda: sorted(w.pid for w in queen.registry.get_workers("hive-test"))
                     == pids)


class BrokenPlugin:
    """A third-party collector that fails for every worker."""

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry):
        raise RuntimeError("sensor unplugged")


async def test_send_heartbeat_handles_collection_failure(nursery):
    """A collector failing for every worker costs each record an error entry; the heartbeat still
    goes out with every worker and its other fields."""
    queen = await start_queen(nursery)
    config = hive_config("failing", heartbeat=FAST, workers=sleeper_specs(2))
    from rbee.hive.agent import HiveAgent

    agent = HiveAgent(config, extra_plugins=[BrokenPlugin()])
    await nursery.start(agent.run)
    await nursery.start(HeartbeatSender(config.heartbeat, url_of(queen), agent).run)
    await wait_until(lambda: len(queen.registry.get_workers("hive-test")) == 2)
    for worker in queen.registry.get_workers("hive-test"):
        assert any("sensor unplugged" in issue.message for issue in worker.errors)
        assert worker.pid > 0 and worker.uptime_s >= 0


async def test_start_heartbeat_task_sends_every_1s(nursery, mock_clock):
    """Under trio's MockClock: with nothing changing, one heartbeat per interval (1 s default),
    on schedule. The transport is httpx's MockTransport (see the module docstring)."""
    sent_at: list[float] = []

    def queen(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":  # the channel's upgrade, refused: the hive then POSTs
            return httpx.Response(404, json={"status": "error", "message": "no channel"})
        sent_at.append(trio.current_time())
        return httpx.Response(200, json={"status": "ok", "message": "accepted"})

    config = hive_config("interval")
    start = trio.current_time()
    await start_hive(nursery, config, "http://queen.test:7833",
                     transport=httpx.MockTransport(queen))
    while len(sent_at) < 6:
        await trio.sleep(0.5)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent_at)]
    assert sent_at[0] - start < 0.01
    assert gaps[:5] == [1.0] * 5


@pytest.fixture
def mock_clock():
    """Jump virtual time only after 20 ms of real idleness, so the agent's collection threads
    finish before the clock moves (pytest-trio runs the test under this clock). Not 0: the 1 s
    schedule is the agent's collection loop, whose ticks run in worker threads, and at 0 virtual
    time races ahead while one runs (the first heartbeat went out 762 virtual seconds late)."""
    return MockClock(autojump_threshold=0.02)


async def test_heartbeat_retries_on_queen_error(nursery, caplog):
    """503 three times, then accepted: the hive retries with backoff, logs the outage once and
    its end once."""
    scripted = ScriptedQueen([503, 503, 503, 200])
    url = await scripted.start(nursery)
    caplog.set_level(logging.WARNING, logger="rbee.hive.heartbeat")
    _, sender = await start_hive(nursery, hive_config("retry", heartbeat=FAST), url)
    await wait_until(lambda: sender.state.delivered >= 1)
    assert len(scripted.bodies) >= 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("heartbeat not delivered: HTTP 503: scripted failure" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


async def test_heartbeat_timeout(nursery):
    """A queen that accepts the connection and never answers: each attempt ends at the read
    timeout, the agent keeps collecting and the sender keeps trying."""

    async def never_answer(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, never_answer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    agent, sender = await start_hive(nursery, hive_config("timeout", heartbeat=FAST),
                                     f"http://127.0.0.1:{port}")
    generation = agent.generation
    await wait_until(lambda: sender.state.failed_attempts >= 3)
    assert sender.state.last_problem == "timed out (ReadTimeout)"
    assert agent.generation > generation  # collection never waited on the queen


async def test_heartbeat_json_serialization(nursery):
    scripted = ScriptedQueen([200])
    url = await scripted.start(nursery)
    agent, _ = await start_hive(nursery, hive_config("json", heartbeat=FAST,
                                                     workers=sleeper_specs(1)), url)
    await wait_until(lambda: len(scripted.bodies) >= 2)
    assert scripted.headers[-1]["content-type"] == "application/json"
    assert scripted.headers[-1]["content-encoding"] == "gzip"
    body = gzip.decompress(scripted.bodies[-1])
    received = decode_heartbeat(body)
    assert received.hive.id == "hive-test"
    assert [w.pid for w in received.workers] == [w.pid for w in agent.monitor.workers()]
    assert b'"cpu_pct":' in body and b'"total_vram_mb":' in body


async def test_heartbeat_uncompressed_when_configured(nursery):
    scripted = ScriptedQueen([200])
    url = await scripted.start(nursery)
    await start_hive(nursery, hive_config("plain", heartbeat={**FAST, "compress": False}), url)
    await wait_until(lambda: len(scripted.bodies) >= 1)
    assert "content-encoding" not in scripted.headers[-1]
    assert decode_heartbeat(scripted.bodies[-1]).hive.id == "hive-test"


async def test_heartbeat_queen_not_found(nursery, caplog):
    """No queen at all (connection refused): logged once, then a reminder, never a crash; when a
    queen starts on that port the hive is registered within about an interval."""
    port = free_port()
    caplog.set_level(logging.WARNING, logger="rbee.hive.heartbeat")
    agent, sender = await start_hive(
        nursery, hive_config("absent", heartbeat={**FAST, "reminder_interval_s": 0.3}),
        f"http://127.0.0.1:{port}")
    await wait_until(lambda: sender.state.failed_attempts >= 3)
    assert sender.state.last_problem.startswith("ConnectError")
    await wait_until(lambda: any("still unreachable after" in r.getMessage()
                                 for r in caplog.records))  # the reminder, 0.3 s on
    messages = [r.getMessage() for r in caplog.records]
    assert sum("heartbeat not delivered: ConnectError" in m for m in messages) == 1
    assert agent.latest.hive.operational_status == "ready"
    queen = await start_queen(nursery, port=port)
    with trio.fail_after(2):  # interval 0.2 s, backoff capped at 0.2 s
        await wait_until(lambda: queen.registry.hive_ids() == ["hive-test"])


async def test_heartbeat_queen_returns_404(nursery):
    queen = await start_queen(nursery)
    _, sender = await start_hive(nursery, hive_config("404", heartbeat=FAST),
                                 f"{url_of(queen)}/wrong-prefix")
    await wait_until(lambda: sender.state.failed_attempts >= 2)
    assert sender.state.last_problem == (
        "HTTP 404: POST /wrong-prefix/v1/hive-heartbeat: not found")
    assert len(queen.registry) == 0


@pytest.mark.parametrize("url, problem", [
    ("ftp://queen:7833", "the scheme must be http or https"),
    ("queen:7833", "the scheme must be http or https"),
    ("http://", "no valid host"),
    ("http://qu een:7833", "no valid host"),
    ("http://queen:port", "invalid URL"),
    ("http://queen:99999", "port 99999 is out of range"),
])
def test_heartbeat_invalid_url(url, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        HeartbeatSender(hive_config("url").heartbeat, url, source=None)
    assert caught.value.key == "queen_url"


async def test_spawn_reaches_the_queen_at_once(nursery):
    """With a 30 s interval, only the push on spawn can explain the queen seeing the worker."""
    queen = await start_queen(nursery)
    agent, sender = await start_hive(nursery, hive_config("push", heartbeat={
        "interval_s": 30}), url_of(queen))
    await wait_until(lambda: sender.state.delivered >= 1)
    await agent.spawn(WorkerSpec(group="llm", instance="new", argv=sleeper()))
    with trio.fail_after(2):
        await wait_until(lambda: [w.instance for w in queen.registry.get_workers("hive-test")]
                         == ["new"])


async def test_heartbeats_fail_over_to_the_next_queen_at_once(nursery):
    """With several queens, a failed send (a refused connection, a 503) goes to the next queen
    without waiting a backoff, and the hive stays with the queen that answers."""
    dead = f"http://127.0.0.1:{free_port()}"
    refusing = ScriptedQueen([503] * 1000)
    refusing_url = await refusing.start(nursery)
    queen = await start_queen(nursery)
    slow_backoff = {**FAST, "backoff_initial_s": 5.0, "backoff_max_s": 5.0}
    _, sender = await start_hive(nursery, hive_config("failover", heartbeat=slow_backoff),
                                 [dead, refusing_url, url_of(queen)])
    with trio.fail_after(1.0):  # far less than one backoff: the round had no wait in it
        await wait_until(lambda: queen.registry.hive_ids() == ["hive-test"])
    assert str(sender.queen_url).rstrip("/") == url_of(queen)
    delivered = sender.state.delivered
    await wait_until(lambda: sender.state.delivered >= delivered + 3)
    assert str(sender.queen_url).rstrip("/") == url_of(queen)  # it stays
    assert len(refusing.bodies) == 1
