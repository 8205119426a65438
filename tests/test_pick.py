"""``GET /v1/pick`` on a real queen (127.0.0.1, port 0) fed real heartbeats over HTTP, and
``rbee pick`` against it: order by score, picks in a row spread, the staleness policies, the
filters and every refusal."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from rbee.contract import EngineState, OperationalStatus, PickAnswer, WorkerState, utc_now

from .builders import gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of

RBEE = str(Path(sys.executable).with_name("rbee"))
FRESH_FOR_MS = 3_600_000
"""A threshold no test run reaches: figures read now stay fresh, whatever the load."""


def serving(instance: str, *, waiting: int = 0, running: int = 0, kv: float | None = None,
            age_s: float = 0.0, model: str = "llama", **fields):
    engine = EngineState(engine="vllm", requests_running=running, requests_waiting=waiting,
                         kv_cache_pct=kv, sampled_at=utc_now() - timedelta(seconds=age_s))
    return worker(instance, model=model, endpoint=f"http://10.1.0.{int(instance[1:])}:8000",
                  engine=engine, **fields)


async def open_queen(nursery, **pick):
    queen = await start_queen(nursery, pick={"stale_after_ms": FRESH_FOR_MS, **pick},
                              stream={"queen_interval_s": 3600, "keepalive_s": 3600})
    client = httpx.AsyncClient(base_url=url_of(queen), timeout=5.0)
    return queen, client


async def picked(client: httpx.AsyncClient, **params) -> PickAnswer:
    response = await client.get("/v1/pick", params=params)
    assert response.status_code == 200, response.text
    return msgspec.json.decode(response.content, type=PickAnswer)


async def test_order_by_score_and_only_pickable_workers(nursery):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [
            serving("w1", waiting=3), serving("w2", running=2, kv=25.0),
            serving("w3", model="other"), worker("w4", model="llama"),  # w4: no endpoint
            serving("w5", state=WorkerState.BACKOFF)]))
        await post_heartbeat(client, queen, heartbeat("hive-b", [serving("w6", kv=10.0)]))
        await post_heartbeat(client, queen, heartbeat(
            "hive-c", [serving("w7")], status=OperationalStatus.STOPPING))
        answer = await picked(client, model="llama", n=5)
    assert [(w.hive_id, w.instance) for w in answer.picked] == [
        ("hive-b", "w6"), ("hive-a", "w2"), ("hive-a", "w1")]
    best = answer.picked[0]
    assert best.endpoint == "http://10.1.0.6:8000"
    assert best.score == 1.4 and best.in_flight == 1  # 4.0 x 10 % + its own pick
    assert answer.picked[1].score == 2.0 and answer.picked[2].score == 3.0
    assert (best.requests_running, best.requests_waiting, best.kv_cache_pct) == (0, 0, 10.0)
    assert 0 <= best.engine_age_ms < FRESH_FOR_MS and best.heartbeat_age_ms >= 0
    assert answer.candidates == 3 and answer.model == "llama" and not answer.all_stale


async def test_picks_in_a_row_spread_until_the_engine_shows_them(nursery):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1"), serving("w2")]))
        first = (await picked(client, model="llama")).picked[0]
        second = (await picked(client, model="llama")).picked[0]
        assert {first.instance, second.instance} == {"w1", "w2"}
        third = (await picked(client, model="llama", n=2)).picked
        assert [w.in_flight for w in third] == [2, 1]
        # both engines now count the first two requests: those picks are done
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1", running=1),
                                                                 serving("w2", running=1)]))
        answer = await picked(client, model="llama", n=2)
    assert sorted(w.in_flight for w in answer.picked) == [1, 1]  # the third pick, and this one


async def answer_of(pick: dict[str, object], workers: list, **params) -> httpx.Response:
    """One GET /v1/pick of a queen of its own (``pick`` settings), fed one heartbeat."""
    async with trio.open_nursery() as inner:
        queen, client = await open_queen(inner, **pick)
        async with client:
            await post_heartbeat(client, queen, heartbeat("hive-a", workers))
            response = await client.get("/v1/pick", params=params)
        inner.cancel_scope.cancel()
    return response


async def test_stale_figures_rank_last_or_are_skipped():
    for policy in ("saturate", "skip"):
        response = await answer_of({"stale_after_ms": 60_000, "stale": policy}, [
            serving("w1", age_s=3600), serving("w2", waiting=5)], model="llama", n=2)
        answer = msgspec.json.decode(response.content, type=PickAnswer)
        if policy == "saturate":
            assert [(w.instance, w.stale) for w in answer.picked] == [("w2", False), ("w1", True)]
            assert answer.picked[1].engine_age_ms >= 3_600_000
        else:
            assert [w.instance for w in answer.picked] == ["w2"] and answer.skipped_stale == 1


async def test_all_stale_fails_open_or_answers_503():
    for policy in ("fail_open", "unavailable"):
        response = await answer_of({"stale_after_ms": 60_000, "all_stale": policy}, [
            serving("w1", age_s=3600, waiting=1), serving("w2", age_s=3600)],
            model="llama", n=2)
        if policy == "fail_open":
            answer = msgspec.json.decode(response.content, type=PickAnswer)
            assert answer.all_stale and [w.instance for w in answer.picked] == ["w2", "w1"]
        else:
            assert response.status_code == 503
            assert "every one of the 2 candidates of model 'llama' has figures older than " \
                   "pick.stale_after_ms (60000 ms)" in response.json()["message"]


async def test_filters_of_the_workers_listing(nursery):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [
            serving("w1", waiting=2, kv=20.0, gpu_indices=[0], vram_mb=1024),
            serving("w2", running=1, kv=80.0, gpu_indices=[1], vram_mb=1024)],
            [gpu(0, total_gib=80, used_gib=75), gpu(1, total_gib=80, used_gib=5)]))
        assert [w.instance for w in (await picked(
            client, model="llama", n=2, max_waiting=0)).picked] == ["w2"]
        assert [w.instance for w in (await picked(
            client, model="llama", n=2, max_kv_cache_pct=50)).picked] == ["w1"]
        assert [w.instance for w in (await picked(
            client, model="llama", n=2, min_free_vram_mb=10240)).picked] == ["w2"]


@pytest.mark.parametrize(("params", "status", "message"), [
    ({}, 400, "query parameter 'model' is required"),
    ({"model": "llama", "n": "0"}, 400, "query parameter 'n' must be from 1 to 100 (pick.max_n), not 0"),
    ({"model": "llama", "n": "101"}, 400, "must be from 1 to 100 (pick.max_n), not 101"),
    ({"model": "llama", "n": "1.5"}, 400, "query parameter 'n' must be a whole number"),
    ({"model": "llama", "n": "two"}, 400, "query parameter 'n' must be a number, not 'two'"),
    ({"model": "llama", "max_waiting": "-1"}, 400, "'max_waiting' must be >= 0"),
    ({"model": "llama", "hive": "a"}, 400, "unknown query parameter(s): hive; known: model, n"),
    ({"model": "mistral"}, 503, "no worker of model 'mistral' can be picked"),
    ({"model": "llama", "max_waiting": "1"}, 503,
     "none of the 1 pickable workers of model 'llama' matches the filters (max_waiting=1)"),
])
async def test_refusals_name_the_problem(nursery, params, status, message):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1", waiting=4)]))
        response = await client.get("/v1/pick", params=params)
    assert response.status_code == status, response.text
    assert response.json()["status"] == "error" and message in response.json()["message"]


async def test_a_hive_that_says_goodbye_is_never_picked(nursery):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1")]))
        assert (await picked(client, model="llama")).picked[0].instance == "w1"
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1")],
                                                      status=OperationalStatus.STOPPED))
        response = await client.get("/v1/pick", params={"model": "llama"})
    assert response.status_code == 503


async def test_rbee_pick_command(nursery):
    queen, client = await open_queen(nursery)
    async with client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [
            serving("w1", waiting=2), serving("w2", kv=25.0, age_s=1.5)]))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RBEE, "pick", "--queen", url_of(queen), *args],
                              capture_output=True, text=True, timeout=30)

    table = await trio.to_thread.run_sync(run, "--model", "llama", "-n", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["WORKER", "ENDPOINT", "SCORE", "RUN", "WAIT", "KV%", "IN-FLIGHT",
                                "ENGINE-AGE", "HB-AGE"]
    assert lines[1].split()[:7] == ["hive-a/llm/w2", "http://10.1.0.2:8000", "2.00", "0", "0",
                                    "25.0", "1"]
    assert lines[1].split()[7].endswith("ms") and int(lines[1].split()[7][:-2]) >= 1500
    assert lines[2].split()[:3] == ["hive-a/llm/w1", "http://10.1.0.1:8000", "2.00"]
    as_json = await trio.to_thread.run_sync(run, "--model", "llama", "--json")
    answer = msgspec.json.decode(as_json.stdout, type=PickAnswer)
    assert answer.picked[0].instance == "w1" and answer.picked[0].in_flight == 1
    refused = await trio.to_thread.run_sync(run, "--model", "mistral")
    assert refused.returncode == 1
    assert "no worker of model 'mistral' can be picked" in refused.stderr
    listed = await trio.to_thread.run_sync(lambda: subprocess.run(
        [RBEE, "workers", "--wide", "--queen", url_of(queen)], capture_output=True, text=True,
        timeout=30))
    header, *rows = listed.stdout.splitlines()
    at = header.index("ENDPOINT")
    assert [row[at:].split()[0] for row in rows[:2]] == ["http://10.1.0.1:8000",
                                                         "http://10.1.0.2:8000"]


def first_header(response: httpx.Response) -> bytes:
    """The raw path (``rbee/http/rawpost.py``) writes content-type first; Starlette's answer
    starts with content-length: which of the two served a request."""
    return response.headers.raw[0][0].lower()


async def test_the_connection_and_the_app_answer_alike(nursery, tmp_path):
    """A plain GET is answered by the connection itself; one the raw path leaves to the app (a
    repeated header, a caller without the read token) gets the same answers from Starlette."""
    token = tmp_path / "read-token"
    token.write_text("a-read-token-of-32-characters-xx\n")
    queen = await start_queen(nursery, read_token_file=str(token),
                              pick={"stale_after_ms": FRESH_FOR_MS})
    reader = {"Authorization": "Bearer a-read-token-of-32-characters-xx"}
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5.0) as client:
        await post_heartbeat(client, queen, heartbeat("hive-a", [serving("w1"),
                                                                 serving("w2", running=1)]))
        raw = await client.get("/v1/pick", params={"model": "llama", "n": 2}, headers=reader)
        bad_raw = await client.get("/v1/pick", params={"n": "2"}, headers=reader)
        # the app takes this connection over for good from its first request
        app = await client.get("/v1/pick", params={"model": "llama", "n": 2},
                               headers=[*reader.items(), ("X-Twice", "1"), ("X-Twice", "2")])
        bad_app = await client.get("/v1/pick", params={"n": "2"},
                                   headers=[*reader.items(), ("X-Twice", "1"), ("X-Twice", "2")])
        unread = await client.get("/v1/pick", params={"model": "llama"})
    assert (first_header(raw), first_header(app)) == (b"content-type", b"content-length")
    first, second = (msgspec.json.decode(r.content, type=PickAnswer) for r in (raw, app))
    assert [w.instance for w in first.picked] == ["w1", "w2"]
    assert [w.instance for w in second.picked] == ["w2", "w1"]  # w1: the first pick in flight
    assert (bad_raw.status_code, bad_raw.content) == (bad_app.status_code, bad_app.content)
    assert bad_raw.status_code == 400 and first_header(bad_raw) == b"content-type"
    assert unread.status_code == 401 and "needs the read token" in unread.json()["message"]
