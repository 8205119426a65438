"""The fast engine poll: a real hive, real workers, and real engine servers on 127.0.0.1.

The heartbeat and the full ``/metrics`` scrape are set to 30 s in the hive tests, so a change that
reaches ``agent.latest`` within the test's deadline can only have come by the fast poll and its
push. The coalescing schedule is checked under trio's MockClock, on the publisher alone."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from rbee.collectors.engine.engines import EngineError, parse_exposition, parse_scheduling
from rbee.collectors.engine.link import EngineLink, EngineStatusError
from rbee.collectors.engine.loads import (
    parse_llamacpp_slots,
    parse_sglang_loads,
    parse_vllm_load,
)

from rbee.config import EngineSettings
from rbee.contract import EngineState
from rbee.hive.agent import HiveAgent
from rbee.hive.engine_poll import SETTLE_SHARE, EnginePoller, next_round

from .engineservers import Answer, bump, fixture, metrics_servers
from .hivekit import hive_config

SLOW = 30.0
"""Heartbeat and full-scrape interval of the hive tests: only the fast poll is faster."""
VLLM = fixture("vllm-0.10.0.prom")


def fake_engine(directory) -> str:
    """An executable that only sleeps, whatever its flags: its argv is what the hive reads."""
    path = directory / "vllm-stand-in"
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def hive(tag: str, workers: list[dict], **engine: object) -> HiveAgent:
    return HiveAgent(hive_config(
        tag, workers=workers, heartbeat={"interval_s": SLOW},
        collect={"interval_s": SLOW, "engine": {"timeout_s": 0.5, "poll_interval_s": 0.02,
                                                "post_min_interval_s": 0.0, **engine}}))


async def until(agent: HiveAgent, predicate, timeout: float = 5.0):
    with trio.fail_after(timeout):
        while True:
            records = {w.instance: w for w in agent.latest.workers}
            if records and predicate(records):
                return records
            await agent.wait_changed()


# -- the link: its own HTTP/1.1 reading, one kept-alive connection -----------------------------------

async def test_the_link_keeps_one_connection_and_reopens_one_the_engine_closed():
    with metrics_servers(VLLM) as [server]:
        server.track_load()
        link = EngineLink(server.url, 2.0, 65536)
        try:
            bodies = [await link.get("/load") for _ in range(20)]
            assert set(bodies) == {b'{"server_load": 19}'}  # 12 running + 7 waiting
            assert link.connections == 1
            server.answer = Answer(VLLM.encode(), declare_length=False)  # then closes
            assert b"vllm:num_requests_running" in await link.get("/metrics")
            assert (await link.get("/load")) == b'{"server_load": 19}'
            assert link.connections == 2
        finally:
            await link.aclose()


async def test_a_get_cancelled_mid_answer_leaves_no_answer_behind_for_the_next():
    """The caller's deadline (the hive's refresh deadline) ends a GET mid-answer: the next GET
    gets its own answer on a fresh connection, not the late one of the GET that was given up."""
    with metrics_servers(Answer(b"late", delay_s=0.3)) as [server]:
        link = EngineLink(server.url, 5.0, 65536)
        try:
            with trio.move_on_after(0.1) as scope:
                await link.get("/metrics")
            assert scope.cancelled_caught
            server.answer = Answer(b"fresh")
            assert await link.get("/metrics") == b"fresh"
            assert link.connections == 2
        finally:
            await link.aclose()


def test_a_link_is_closed_after_its_trio_run_too():
    """A teardown may come after the run that opened the link (a collector closed late)."""
    with metrics_servers(VLLM) as [server]:
        server.track_load()
        link = EngineLink(server.url, 2.0, 65536)
        assert trio.run(link.get, "/load") == b'{"server_load": 19}'
        fd = link._stream.socket.fileno()
        link.close()
        with pytest.raises(OSError):
            os.fstat(fd)
        link.close()  # twice is harmless


async def test_the_link_says_what_went_wrong_and_never_raises_anything_else():
    with metrics_servers(Answer(b"x" * 5000), Answer(b"nope", 503),
                         Answer(b"slow", delay_s=1.0)) as [big, failing, slow]:
        cases = [(big.url, "sent 5000 bytes, over collect.engine.max_bytes (1024)"),
                 (failing.url, "HTTP 503 from http://127.0.0.1:"),
                 (slow.url, "no answer from http://127.0.0.1:"),
                 ("http://127.0.0.1:1/metrics", "cannot read http://127.0.0.1:1/metrics")]
        for url, problem in cases:
            link = EngineLink(url, 0.3, 1024)
            try:
                await link.get("/metrics")
            except EngineError as exc:
                assert problem in str(exc), (url, str(exc))
                if "503" in problem:
                    assert isinstance(exc, EngineStatusError) and exc.status == 503
            else:
                raise AssertionError(f"{url}: no error")
            finally:
                await link.aclose()


async def raw_answer(answer: bytes, path: str = "/load") -> bytes | str:
    """What a link makes of ``answer``, sent as it is by a raw server (then it closes): the
    body, or the error's message."""
    async def server(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        link = EngineLink(f"http://127.0.0.1:{port}/metrics", 1.0, 4096)
        try:
            return await link.get(path)
        except EngineError as exc:
            return str(exc)
        finally:
            await link.aclose()
            nursery.cancel_scope.cancel()


async def test_the_link_reads_what_an_engine_may_send_and_refuses_the_rest():
    ok = b"HTTP/1.1 200 OK\r\n"
    assert await raw_answer(ok + b"Transfer-Encoding: chunked\r\n\r\n"
                            b"5\r\n{\"a\":\r\n2;x=y\r\n1}\r\n0\r\n\r\n") == b'{"a":1}'
    assert await raw_answer(b"HTTP/1.0 200 OK\r\n\r\nuntil the end") == b"until the end"
    assert await raw_answer(b"HTTP/1.1 100 Continue\r\n\r\n" + ok
                            + b"Content-Length: 2\r\n\r\n{}") == b"{}"
    refused = {
        b"SPAM 200 whatever\r\n\r\n": "not an HTTP answer: b'SPAM 200 whatever'",
        ok + b"Content-Length: 10\r\n\r\nshort": "the connection closed mid-answer",
        ok + b"Content-Length: 1e3\r\n\r\n": "bad Content-Length b'1e3'",
        ok + b"no colon here\r\n\r\n": "bad header line b'no colon here'",
        ok + b"X: " + b"x" * 20000: "sent a head over 16384 bytes",
        ok + b"Transfer-Encoding: gzip\r\n\r\n": "unsupported Transfer-Encoding",
        ok + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n": "bad chunk size b'zz'",
        ok + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n": "does not end where",
        ok + b"Transfer-Encoding: chunked\r\n\r\n2000\r\n": "more than 4096 bytes",
        ok + b"\r\n" + b"x" * 5000: "more than 4096 bytes",
        b"": "the engine closed the connection",
    }
    for answer, problem in refused.items():
        found = await raw_answer(answer)
        assert isinstance(found, str) and problem in found, (answer[:40], found)
    assert "not a path" in await raw_answer(ok, path="/load\r\nX: y")


# -- the load endpoints, as the engines answer them ------------------------------------------

def test_each_engines_load_answer_is_read_and_hostile_ones_are_refused():
    assert parse_vllm_load(b'{"server_load": 3}').in_flight == 3
    sglang = parse_sglang_loads(b'{"loads": [{"dp_rank": 0, "num_running_reqs": 2, '
                                b'"num_waiting_reqs": 1, "token_usage": 0.5}, {"dp_rank": 1, '
                                b'"num_running_reqs": 1, "num_waiting_reqs": 0, '
                                b'"token_usage": 0.75}]}')
    assert (sglang.running, sglang.waiting, sglang.kv_cache_fraction) == (3, 1, 0.75)
    assert parse_sglang_loads(b'[{"num_running_reqs": 4}]').running == 4  # a bare list
    slots = parse_llamacpp_slots(b'[{"id": 0, "n_ctx": 4096, "is_processing": true}, '
                                 b'{"id": 1, "n_ctx": 4096, "is_processing": false}]')
    assert (slots.running, slots.waiting) == (1, None)
    hostile = [(parse_vllm_load, b"<html>", "vLLM /load is not JSON"),
               (parse_vllm_load, b'{"server_load": "many"}', "vLLM /load is not what"),
               (parse_vllm_load, b'{"server_load": -4}', "server_load is negative (-4)"),
               (parse_vllm_load, b'{"server_load": 1e300}', "vLLM /load is not what"),
               (parse_vllm_load, b'{"server_load": 99999999999999999}', "past any real"),
               (parse_sglang_loads, b'{"loads": []}', "lists no data-parallel rank"),
               (parse_sglang_loads, b'[{"token_usage": 7.0}]', "token_usage out of range"),
               (parse_llamacpp_slots, b'{"slots": 1}', "llama.cpp /slots is not what")]
    for parse, body, problem in hostile:
        try:
            parse(body)
        except EngineError as exc:
            assert problem in str(exc), (body, str(exc))
        else:
            raise AssertionError(f"{body!r} accepted")


def test_an_in_flight_count_moves_the_queue_first():
    state = EngineState(engine="vllm", requests_running=4, requests_waiting=2, kv_cache_pct=50.0,
                        generation_tokens_s=10.0)
    more = parse_vllm_load(b'{"server_load": 9}').apply(state)
    assert (more.requests_running, more.requests_waiting) == (4, 5)
    fewer = parse_vllm_load(b'{"server_load": 3}').apply(state)
    assert (fewer.requests_running, fewer.requests_waiting) == (3, 0)
    assert fewer.generation_tokens_s == 10.0 and fewer.kv_cache_pct == 50.0  # kept


# -- in a real hive --------------------------------------------------------------------------

async def test_a_load_change_reaches_the_snapshot_by_the_fast_poll_with_its_age(tmp_path):
    with metrics_servers(VLLM, VLLM) as [tracked, plain]:
        tracked.track_load()
        engine = fake_engine(tmp_path)
        agent = hive("engine-poll", [
            {"group": "llm", "instance": "tracked", "metrics_url": tracked.url,
             "argv": [engine, "--enable-server-load-tracking"]},
            {"group": "llm", "instance": "plain", "metrics_url": plain.url, "argv": [engine]}])
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await until(agent, lambda r: all(w.engine for w in r.values()))
            before = datetime.now(UTC)
            tracked.serve_text(bump(VLLM, "vllm:num_requests_waiting", 5))  # 19 -> 24 in flight
            plain.serve_text(bump(VLLM, "vllm:num_requests_running", -10))
            records = await until(agent, lambda r: r["tracked"].engine.requests_waiting == 12
                                  and r["plain"].engine.requests_running == 2)
            nursery.cancel_scope.cancel()
    tracked_engine = records["tracked"].engine
    assert tracked_engine.requests_running == 12  # the last full reading's split
    assert tracked_engine.sampled_at >= before and records["plain"].engine.sampled_at >= before
    assert tracked.paths.count("/load") >= 1 and tracked.paths.count("/metrics") == 1
    assert "/load" not in plain.paths  # no flag: /load would answer 0 forever
    assert plain.paths.count("/metrics") >= 2  # the full reading, then the fast polls


async def test_an_engine_that_stops_answering_is_pushed_then_its_recovery(tmp_path):
    with metrics_servers(VLLM) as [server]:
        server.track_load()
        agent = hive("engine-poll-down", [
            {"group": "llm", "instance": "a", "metrics_url": server.url,
             "argv": [fake_engine(tmp_path), "--enable-server-load-tracking"]}])
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await until(agent, lambda r: r["a"].engine is not None)
            server.others["/load"] = Answer(b'{"server_load": "lots"}')
            records = await until(agent, lambda r: r["a"].engine is None)
            assert [e.collector for e in records["a"].errors] == ["engine.scraper"]
            assert "vLLM /load is not what the engine answers" in records["a"].errors[0].message
            del server.others["/load"]
            records = await until(agent, lambda r: r["a"].engine is not None)
            assert records["a"].errors == [] and records["a"].engine.requests_running == 12
            nursery.cancel_scope.cancel()


async def test_an_engine_without_the_load_endpoint_is_polled_on_its_metrics(tmp_path):
    text = fixture("sglang-0.4.prom")
    with metrics_servers(text) as [server]:  # an SGLang before /v1/loads: 404
        agent = hive("engine-poll-404", [
            {"group": "llm", "instance": "s", "metrics_url": server.url,
             "argv": [fake_engine(tmp_path)]}])
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            first = await until(agent, lambda r: r["s"].engine is not None)
            server.serve_text(bump(text, "sglang:num_queue_reqs", 3))
            waiting = first["s"].engine.requests_waiting + 3
            await until(agent, lambda r: r["s"].engine.requests_waiting == waiting)
            nursery.cancel_scope.cancel()
    assert server.paths.count("/v1/loads?include=core") == 1


async def test_another_engine_on_the_port_gets_its_own_fast_path(tmp_path):
    with metrics_servers(VLLM) as [server]:
        server.track_load()
        agent = HiveAgent(hive_config(
            "engine-poll-swap", heartbeat={"interval_s": SLOW},
            collect={"interval_s": 0.3, "engine": {"poll_interval_s": 0.02}},
            workers=[{"group": "llm", "instance": "a", "metrics_url": server.url,
                      "argv": [fake_engine(tmp_path), "--enable-server-load-tracking"]}]))
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await until(agent, lambda r: r["a"].engine is not None)
            server.serve_text(fixture("sglang-0.4.prom"))  # /load now says 0: not sglang's
            await until(agent, lambda r: r["a"].engine is not None
                        and r["a"].engine.engine == "sglang")
            polls = len(server.paths)
            with trio.fail_after(5):
                while server.paths[polls:].count("/metrics") < 10:
                    await trio.sleep(0.02)  # the scheduling families, polled
            engine = agent.latest.workers[0].engine
            nursery.cancel_scope.cancel()
    assert (engine.requests_running, engine.requests_waiting) == (162, 2826)
    assert "/v1/loads?include=core" in server.paths  # tried, 404, then /metrics


# -- the publisher's schedule, under MockClock -----------------------------------------------

@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_rounds_changes_are_published_together_once_its_polls_answered(autojump_clock):
    published: list[tuple[float, dict]] = []
    settings = EngineSettings(poll_interval_s=0.05, post_min_interval_s=0.25)
    channel = [True]
    poller = EnginePoller(lambda: [], settings, lambda c: published.append((trio.current_time(),
                                                                            dict(c))),
                          on_channel=lambda: channel[0])
    state = EngineState(engine="vllm", requests_running=1, requests_waiting=0)

    def change(key: str, value, changed: bool = True) -> None:
        poller._hand_over({}, ("g", key), value, trio.current_time(), changed)

    async def answered(delay: float, key: str | None) -> None:
        """A poll in flight for ``delay``, then its change (if any) handed over."""
        poller._poll_sent()
        await trio.sleep(delay)
        if key is not None:
            change(key, state)
        poller._poll_answered()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller._publisher)
        start = trio.current_time()
        change("a", state)  # no poll in flight: at once
        await trio.sleep(0.05)
        for delay, key in [(0.001, "b"), (0.003, "c"), (0.004, None)]:  # one round's polls
            nursery.start_soon(answered, delay, key)
        await trio.sleep(0.05)
        nursery.start_soon(answered, 0.001, "d")
        nursery.start_soon(answered, 1.0, None)  # a hung engine holds no round back for long
        await trio.sleep(1.2)
        channel[0] = False  # the sender is on POST now: post_min_interval_s
        posted = trio.current_time()
        change("a", "down")
        await trio.sleep(0.01)
        change("b", "down")
        await trio.sleep(1.0)
        resent = trio.current_time()
        change("a", state, changed=False)  # a confirmation holds no change back
        await trio.sleep(0.001)
        change("b", state)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert [sorted(c) for _, c in published] == [[("g", "a")], [("g", "b"), ("g", "c")],
                                                 [("g", "d")], [("g", "a")], [("g", "b")],
                                                 [("g", "a")], [("g", "b")]]
    times = [round(at - start, 4) for at, _ in published]
    assert times[:3] == [0.0, 0.054, round(0.101 + 0.05 * SETTLE_SHARE, 4)]
    assert [round(at - posted, 4) for at, _ in published[3:5]] == [0.0, 0.25]
    assert [round(at - resent, 4) for at, _ in published[5:]] == [0.0, 0.001]


def test_every_engine_is_polled_at_the_same_instants():
    assert next_round(0.0, 0.05) == 0.05
    assert next_round(10.013, 0.05) == pytest.approx(10.05)
    assert next_round(10.05, 0.05) == pytest.approx(10.1)  # polled at a round's start: the next
    assert all(next_round(10.0 + 0.049 * k / 7, 0.05) == pytest.approx(10.05) for k in range(8))


def test_an_unchanged_state_is_sent_again_over_the_channel_only():
    channel = [True]
    poller = EnginePoller(lambda: [], EngineSettings(resend_after_s=0.4), lambda c: None,
                          on_channel=lambda: channel[0])
    slot = {"poll_sent_at": 10.0}
    assert not poller._due_again(slot, 10.3)
    assert poller._due_again(slot, 10.4)
    channel[0] = False  # over POST the heartbeat re-sends it
    assert not poller._due_again(slot, 11.0)
    off = EnginePoller(lambda: [], EngineSettings(resend_after_s=0), lambda c: None,
                       on_channel=lambda: True)
    assert not off._due_again(slot, 99.0)


async def test_over_the_channel_a_change_and_a_confirmation_reach_the_queen(tmp_path):
    """The real daemons, heartbeats every 30 s: the queen hears the change, and a fresher
    ``sampled_at`` for an unchanged engine, only through the poll's pushes over the channel
    (rbee-hive's service tells the poll when its channel is open)."""
    from .test_end_to_end import hive, queen

    with metrics_servers(VLLM) as [server]:
        server.track_load()
        with queen(tmp_path) as q, hive(
                tmp_path, "poll-channel", q.url,
                [{"group": "llm", "instance": "a", "metrics_url": server.url,
                  "argv": [fake_engine(tmp_path), "--enable-server-load-tracking"]}],
                heartbeat={"interval_s": SLOW, "transport": "channel"},
                collect={"interval_s": SLOW, "engine": {"poll_interval_s": 0.02,
                                                        "resend_after_s": 0.2}}):
            async with httpx.AsyncClient(timeout=5) as client:
                async def engine_at_queen() -> dict | None:
                    workers = (await client.get(f"{q.url}/v1/workers")).json()
                    return workers[0]["worker"].get("engine") if workers else None

                with trio.fail_after(15):
                    while (await engine_at_queen()) is None:
                        await trio.sleep(0.02)
                first = (await engine_at_queen())["sampled_at"]
                with trio.fail_after(5):  # nothing changed: confirmed after resend_after_s
                    while (await engine_at_queen())["sampled_at"] == first:
                        await trio.sleep(0.02)
                server.serve_text(bump(VLLM, "vllm:num_requests_waiting", 4))
                with trio.fail_after(5):
                    while (await engine_at_queen())["requests_waiting"] != 11:
                        await trio.sleep(0.02)


def test_a_figure_past_the_contracts_bound_is_refused_not_sent():
    """The queen refuses a heartbeat with a figure past the contract's bound: the engine's
    reading is refused instead, so the rest of the heartbeat still goes."""
    text = "vllm:num_requests_running 1e15\nvllm:num_requests_waiting 0\n"
    for parse in (lambda: parse_scheduling(text, "vllm"), lambda: parse_exposition(text, 0.0)):
        try:
            parse()
        except EngineError as exc:
            assert "within the contract's bound: 1000000000000000.0" in str(exc)
        else:
            raise AssertionError("accepted")
