"""The hive's end of its channel: a real hive agent (real workers) and real queens on 127.0.0.1.
A refused upgrade falls back to POST and the channel is tried again later; a queen that dies
hands the hive to the next ``queen_url``; a queen that stops answering holds the hive to
``max_unacked`` frames. The reconnect schedule runs under trio's MockClock with httpx's
MockTransport (virtual time and real sockets do not mix; the schedule is the point there)."""

from __future__ import annotations

import itertools
import logging

import httpx
import pytest
import trio
from starlette.routing import WebSocketRoute

from rbee.config import HttpSettings
from rbee.contract import (
    ChannelAck,
    ChannelDelta,
    ChannelSnapshot,
    decode_hive_frame,
    encode_frame,
    paths,
)
from rbee.hive.heartbeat import HeartbeatSender, reconnect_delay
from rbee.http.app import json_app
from rbee.http.serving import serve

from .builders import heartbeat
from .hivekit import hive_config, sleeper_specs, start_hive
from .queenkit import start_queen, url_of, wait_until
from .test_hardening import tls_files  # noqa: F401 (a fixture)

FAST = {"interval_s": 0.1, "read_timeout_s": 0.5, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2,
        "snapshot_every_s": 0.5}


async def test_a_hive_reports_over_its_channel_in_deltas(nursery):
    queen = await start_queen(nursery)
    agent, sender = await start_hive(nursery, hive_config("channel", heartbeat=FAST,
                                                          workers=sleeper_specs(2)), url_of(queen))
    await wait_until(lambda: len(queen.registry.get_workers("hive-test")) == 2)
    await wait_until(lambda: sender.state.delivered >= 8)
    maker = sender.channel.maker
    assert maker.seq > maker.snapshot_seq > 0  # deltas, and the periodic snapshot
    assert queen.metrics.channels._value.get() == 1
    assert queen.metrics.received._value.get() >= 8
    workers = queen.registry.get_workers("hive-test")
    assert sorted(w.pid for w in workers) == sorted(w.pid for w in agent.monitor.workers())


async def test_a_refused_upgrade_falls_back_to_post_and_retries_later(nursery, caplog):
    caplog.set_level(logging.WARNING, logger="rbee.hive.heartbeat")
    queen = await start_queen(nursery, channel_enabled=False)
    _, sender = await start_hive(nursery, hive_config("fallback", heartbeat={
        **FAST, "channel_retry_s": 0.3}), url_of(queen))
    await wait_until(lambda: queen.registry.hive_ids() == ["hive-test"])
    await wait_until(lambda: sum("heartbeats go by POST" in r.getMessage()
                                 for r in caplog.records) >= 2)  # the channel was tried again
    assert "channel refused: HTTP 403 to the upgrade" in caplog.records[0].getMessage()
    assert sender.state.failures_total == 0  # a refusal is no lost heartbeat
    assert queen.metrics.channels._value.get() == 0


async def test_transport_post_never_tries_the_channel(nursery, caplog):
    caplog.set_level(logging.WARNING, logger="rbee.hive")
    queen = await start_queen(nursery)
    _, sender = await start_hive(nursery, hive_config("post", heartbeat={
        **FAST, "transport": "post"}), url_of(queen))
    await wait_until(lambda: sender.state.delivered >= 3)
    assert sender.channel is None
    assert queen.metrics.channels._value.get() == 0
    assert not caplog.records


async def test_transport_channel_never_posts(nursery):
    queen = await start_queen(nursery, channel_enabled=False)
    _, sender = await start_hive(nursery, hive_config("only", heartbeat={
        **FAST, "transport": "channel"}), url_of(queen))
    await wait_until(lambda: sender.state.failed_attempts >= 3)
    assert sender.state.last_problem == "channel refused: HTTP 403 to the upgrade"
    assert queen.registry.hive_ids() == []


async def test_the_channel_fails_over_to_the_next_queen(nursery):
    first, second = await start_queen(nursery), await start_queen(nursery)
    _, sender = await start_hive(nursery, hive_config("failover", heartbeat=FAST),
                                 [url_of(first), url_of(second)])
    await wait_until(lambda: first.registry.hive_ids() == ["hive-test"])
    first.stop()
    with trio.fail_after(1.5):  # the stopping queen closes its channels at once (no grace)
        await wait_until(lambda: second.registry.hive_ids() == ["hive-test"])
    assert str(sender.queen_url).rstrip("/") == url_of(second)
    delivered = sender.state.delivered
    await wait_until(lambda: sender.state.delivered >= delivered + 3)
    assert str(sender.queen_url).rstrip("/") == url_of(second)  # it stays


class SilentQueen:
    """A real WebSocket server that takes every frame and answers none (a stuck queen), or,
    with ``answer_after_s``, acks each one that long after it came (a slow queen)."""

    def __init__(self, answer_after_s: float | None = None) -> None:
        self.frames: list[list[bytes]] = []
        self.answer_after_s = answer_after_s

    async def _channel(self, websocket) -> None:
        await websocket.accept()
        frames: list[bytes] = []
        self.frames.append(frames)
        while (message := await websocket.receive())["type"] != "websocket.disconnect":
            frames.append(message["bytes"])
            if self.answer_after_s is not None:
                await trio.sleep(self.answer_after_s)
                seq = decode_hive_frame(message["bytes"]).seq
                await websocket.send_bytes(encode_frame(ChannelAck(seq)))

    async def start(self, nursery: trio.Nursery) -> str:
        app = json_app([WebSocketRoute(paths.CHANNEL, self._channel)])
        urls = await nursery.start(lambda task_status: serve(
            app, "127.0.0.1", 0, HttpSettings(), shutdown_trigger=trio.sleep_forever,
            task_status=task_status))
        return urls[0]


async def test_a_queen_that_stops_answering_holds_the_hive_to_its_window(nursery):
    silent = SilentQueen()
    url = await silent.start(nursery)
    _, sender = await start_hive(nursery, hive_config("window", heartbeat={
        **FAST, "max_unacked": 3}), url)
    await wait_until(lambda: len(silent.frames) >= 2)  # the first channel timed out
    first = silent.frames[0]
    assert len(first) == 3  # the window, never more however many beats the hive made
    frames = [decode_hive_frame(data) for data in first]
    assert [type(f) for f in frames] == [ChannelSnapshot, ChannelDelta, ChannelDelta]
    assert [f.seq for f in frames] == [0, 1, 2]
    assert sender.state.last_problem == ("channel: no answer to frame 0 within read_timeout_s "
                                         "(0.5s)")


async def test_a_hive_behind_a_slow_queen_coalesces_into_its_newest_state(nursery):
    """Beats every 20 ms, answers after 150 ms, one frame in flight: the hive sends one frame
    per answer, each carrying its newest state, never the backlog."""
    slow = SilentQueen(answer_after_s=0.15)
    url = await slow.start(nursery)
    agent, sender = await start_hive(nursery, hive_config("slow", heartbeat={
        **FAST, "interval_s": 0.02, "max_unacked": 1}), url)
    await wait_until(lambda: sender.state.delivered >= 6)
    generation = agent.generation
    frames = [decode_hive_frame(data) for data in slow.frames[0]]
    assert len(slow.frames) == 1  # one channel all along
    assert [f.seq for f in frames] == list(range(len(frames)))  # no gap, nothing dropped
    assert len(frames) <= sender.state.delivered + 1  # one in flight at most
    assert generation >= 3 * len(frames)  # far more beats than frames: coalesced
    stamps = [f.timestamp if type(f) is ChannelDelta else f.heartbeat.timestamp for f in frames]
    gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(stamps[1:]))
    assert gaps[len(gaps) // 2] >= 0.1  # each frame the state of its send, not the next beat


def test_reconnect_waits_are_full_jitter_doubling_to_the_cap():
    settings = hive_config("delays").heartbeat
    assert (settings.reconnect_initial_s, settings.reconnect_max_s) == (0.5, 15.0)
    assert [reconnect_delay(settings, n, None, 1.0) for n in range(7)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert reconnect_delay(settings, 3, None, 0.25) == 1.0
    assert reconnect_delay(settings, 0, None, 0.0) == 0.0  # full jitter: from zero
    assert reconnect_delay(settings, 2, 7.0, 0.5) == 8.0  # Retry-After first


class OneHeartbeat:
    """The sender's source, standing in for the agent: a schedule test needs no workers."""

    generation = 1
    latest = heartbeat("hive-test")

    async def wait_newer(self, generation: int):
        if generation >= self.generation:
            await trio.sleep_forever()
        return self.generation, self.latest


@pytest.mark.parametrize("answer, expected, problem", [
    (None, [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 30.5, 45.5], "ConnectError: connection refused"),
    (httpx.Response(503, headers={"retry-after": "7"}),
     [0.0, 7.5, 15.5, 24.5, 35.5, 50.5, 72.5, 94.5], "channel refused: HTTP 503 to the upgrade"),
])
async def test_the_reconnect_schedule_under_a_mock_clock(nursery, mock_clock, answer, expected,
                                                         problem):
    """A queen that is down (connection refused) or busy (503, Retry-After: 7): attempts at full
    jitter's upper bound (the random fraction pinned to 1.0), doubling to the cap."""
    attempts: list[float] = []

    def queen(request: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        if answer is None:
            raise httpx.ConnectError("connection refused", request=request)
        return answer

    start = trio.current_time()
    sender = HeartbeatSender(hive_config("schedule").heartbeat, "http://queen.test:7833",
                             OneHeartbeat(), transport=httpx.MockTransport(queen),
                             random_fraction=lambda: 1.0)
    await nursery.start(sender.run)
    while len(attempts) < len(expected):
        await trio.sleep(1)
    assert [round(t - start, 3) for t in attempts[:len(expected)]] == expected
    assert sender.state.last_problem == problem
    assert sender.state.delivered == 0


async def test_the_channel_runs_over_tls_with_the_hives_ca_file(nursery, tls_files):  # noqa: F811
    """``https://`` queen: the upgrade is TLS (``wss``), verified against ``queen_ca_file`` as
    the POSTs are; a hive that does not trust the CA gets nothing through either way."""
    queen = await start_queen(nursery, http={"tls_cert_file": tls_files["cert"],
                                             "tls_key_file": tls_files["key"]})
    _, sender = await start_hive(nursery, hive_config("tls", heartbeat=FAST), url_of(queen),
                                 ca_file=tls_files["ca"])
    await wait_until(lambda: sender.state.delivered >= 3)
    assert queen.metrics.channels._value.get() == 1
    assert sender.channel.maker.seq >= 2
    _, stranger = await start_hive(nursery, hive_config("tls-stranger", id="stranger",
                                                        heartbeat=FAST), url_of(queen))
    await wait_until(lambda: stranger.state.failed_attempts >= 2)
    assert stranger.state.delivered == 0 and "ConnectError" in stranger.state.last_problem
    assert queen.registry.hive_ids() == ["hive-test"]
