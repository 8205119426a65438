"""History at fleet scale: plugin figures as series (in memory and over ``GET /v1/history``), rows
that follow a hive's workers and GPUs as they come and go, the coarse tier as NaN-aware means of
the fine points, and a recording step that yields between chunks of hives (the queen's event loop
is never held for the whole fleet)."""

from __future__ import annotations

import time

import httpx
import msgspec
import trio

from rbee.contract import HiveRecord
from rbee.queen.history import FleetHistory, Selector
from rbee.queen.history.fleet import HIVES_PER_CHUNK
from rbee.queen.registry import HiveRegistry
from tests.fleetload import eight_gpu_hive

from .builders import gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of
from .rediskit import running_redis, wait_for
from .test_history import T0, record_of, wide


def _values(history: FleetHistory, metric: str, since: float, now: float, **labels) -> dict:
    answer = history.query(Selector(metrics=frozenset({metric}), **labels), since, None, now)
    return {(s.hive, s.instance or s.gpu): s.values for s in answer.series}


def _run(history: FleetHistory, now: float) -> None:
    for _ in history.recording(now):
        pass


def test_plugin_figures_are_series_of_their_own_in_float32():
    history = FleetHistory(wide())
    for second in range(3):
        figures = {"ctxsw.procs": 100_000.0 + second, "ctxsw.rate": -2.5}  # past float16's range
        if second == 1:
            del figures["ctxsw.rate"]  # not sent this time: a gap
        history.record([record_of("a", [worker("w", metrics=figures), worker("plain")])],
                       T0 + second)
    assert history.metrics() >= {"ctxsw.procs", "ctxsw.rate", "cpu_pct"}
    assert _values(history, "ctxsw.procs", 3, T0 + 2.5) == {("a", "w"): [100000.0, 100001.0,
                                                                          100002.0]}
    assert _values(history, "ctxsw.rate", 3, T0 + 2.5) == {("a", "w"): [-2.5, None, -2.5]}
    every = history.query(Selector(instance="w"), 3, None, T0 + 2.5).series
    assert [s.metric for s in every][:4] == ["cpu_pct", "ctxsw.procs", "ctxsw.rate",
                                             "gpu_util_pct"]  # sorted among the built-in ones


def test_rows_follow_workers_and_gpus_as_they_come_and_go():
    history = FleetHistory(wide(fine_retention_s=60, coarse_retention_s=600))
    a, b = worker("a", cpu_pct=1.0), worker("b", cpu_pct=2.0)
    gpus = [gpu(0, total_gib=80, used_gib=1, util_pct=10.0)]
    history.record([record_of("h", [a, b], gpus)], T0)
    history.record([record_of("h", [b], [])], T0 + 1)  # a and the GPU left
    history.record([record_of("h", [worker("a", cpu_pct=3.0), b], gpus)], T0 + 2)  # back
    assert _values(history, "cpu_pct", 3, T0 + 2.5) == {("h", "a"): [1.0, None, 3.0],
                                                        ("h", "b"): [2.0, 2.0, 2.0]}
    assert _values(history, "util_pct", 3, T0 + 2.5) == {("h", "GPU-00000000"): [10.0, None,
                                                                                 10.0]}
    assert len(history) == 2 * 9 + 5  # the same rows again, none taken twice


def test_a_hive_not_noted_since_the_last_step_is_not_read_again():
    """A hive the registry did not change since the last step costs the step nothing: no
    figure is read, the step repeats its current values."""
    registry, history = HiveRegistry(), FleetHistory(wide())
    registry.observe(history.hive_changed)
    beat = heartbeat("h", [worker("w", cpu_pct=5.0)])
    registry.update_hive(beat)
    _run(history, T0)
    beat.workers[0].cpu_pct = 99.0  # never done to a stored struct: shows it is not re-read
    assert sum(1 for _ in history.recording(T0 + 1)) == 0  # no part: nothing gathered
    assert _values(history, "cpu_pct", 2, T0 + 1.5) == {("h", "w"): [5.0, 5.0]}


def test_coarse_points_are_nan_aware_means_of_the_fine_ones_even_across_a_stall():
    history = FleetHistory(wide(fine_retention_s=60, coarse_retention_s=600))
    for second in [*range(0, 5), *range(7, 10), 35]:  # 3, 4 stale; 5, 6 and 10..34 skipped
        stale = second in (3, 4)
        history.record([record_of("h", [worker("w", cpu_pct=float(second))], stale=stale)],
                       T0 + second)
    answer = history.query(Selector(metrics=frozenset({"cpu_pct"})), 600, None, T0 + 35.5)
    assert answer.step == 10.0
    assert answer.series[0].values[-4:] == [(0 + 1 + 2 + 7 + 8 + 9) / 6, None, None, 35.0]
    closed = history.values.coarse.last - T0 // 10
    assert closed == 2  # buckets 0..2 closed; 3 (35 s) still open: the mean of its fine points


def test_recording_yields_between_chunks_of_hives():
    history = FleetHistory(wide())
    fleet = [record_of(f"h{i:05d}", [worker("w")]) for i in range(2 * HIVES_PER_CHUNK + 1)]
    history.take_fleet(fleet)
    parts = sum(1 for _ in history.recording(T0))
    assert parts == 1 + 3  # the notes sorted (up to NOTES_PER_PART a part), three chunks read
    assert sum(1 for _ in history.recording(T0 + 1)) == 0  # nothing noted: no gathering
    assert len(_values(history, "cpu_pct", 2, T0 + 1.5, group="llm")) == len(fleet)


def test_the_registry_notes_each_change_and_a_step_records_what_was_noted():
    """The queen's path: the history observes a real registry (a heartbeat is one dict write),
    a step records the hives noted since the last one; a hive that sent nothing since keeps its
    last figures, a stale or removed one is a gap from its verdict on."""
    registry, history = HiveRegistry(), FleetHistory(wide())
    registry.observe(history.hive_changed)
    registry.update_hive(heartbeat("a", [worker("w", cpu_pct=10.0)]))
    registry.update_hive(heartbeat("b", [worker("w", cpu_pct=20.0)]))
    _run(history, T0)
    registry.update_hive(heartbeat("a", [worker("w", cpu_pct=30.0)]))  # only a reported
    assert set(history._pending) == {"a"}
    _run(history, T0 + 1)
    registry.mark_stale("b")
    _run(history, T0 + 2)
    registry.remove_hive("a")
    registry.update_hive(heartbeat("b", [worker("w", cpu_pct=40.0)]))  # b is back
    _run(history, T0 + 3)
    assert _values(history, "cpu_pct", 4, T0 + 3.5) == {
        ("a", "w"): [10.0, 30.0, 30.0, None], ("b", "w"): [20.0, 20.0, None, 40.0]}
    assert not history._pending


def test_a_new_hive_is_recorded_within_the_fine_step_the_others_at_the_next():
    """With a 5 s fine step, a hive seen for the first time shows in the current step's point
    at the next tick (a query right after it arrived answers it); hives already recorded wait
    for the next step, whatever they sent meanwhile."""
    history = FleetHistory(wide(fine_step_s=5.0, coarse_step_s=300.0))
    history.record([record_of("a", [worker("w", cpu_pct=1.0)])], T0)
    history.take_fleet([record_of("a", [worker("w", cpu_pct=2.0)]),
                        record_of("b", [worker("w", cpu_pct=3.0)])])
    _run(history, T0 + 1)
    assert _values(history, "cpu_pct", 5, T0 + 1.5) == {("a", "w"): [1.0], ("b", "w"): [3.0]}
    _run(history, T0 + 5)
    assert _values(history, "cpu_pct", 10, T0 + 5.5) == {("a", "w"): [1.0, 2.0],
                                                         ("b", "w"): [3.0, 3.0]}


def test_the_defaults_hold_ten_thousand_eight_gpu_hives_with_the_series_views_read():
    """The default history keeps the six worker figures the dashboard, rbee top and rbee
    workers read, at 5 s for 5 minutes and 5 minutes for 6 hours (267 bytes a series): 10,000
    eight-GPU hives fit in ``max_bytes``. Figures not kept are not answered."""
    history = FleetHistory()
    assert history.worker_metrics == ("cpu_pct", "rss_mb", "gpu_util_pct", "vram_mb",
                                      "engine_waiting", "kv_cache_pct")
    assert history.gpu_metrics == () and history.values.row_bytes == 2 * (60 + 72) + 2 + 1
    beat = eight_gpu_hive("h", 0)
    history.record([HiveRecord(info=beat.hive, workers=beat.workers, gpus=beat.capabilities)], T0)
    assert len(history) == 8 * 6 and history.budget.used == 48 * 267
    assert 10_000 * history.budget.used <= history.settings.max_bytes
    assert "temperature_c" not in history.metrics() and "cpu_pct" in history.metrics()
    answer = history.query(Selector(hive="h"), 300, 5, T0 + 1)
    assert {s.metric for s in answer.series} == set(history.worker_metrics)
    assert len(answer.series) == 48 and answer.timestamps[-1] == T0
    waiting = [s.values[-1] for s in answer.series if s.metric == "engine_waiting"]
    assert waiting == [float(w.engine.requests_waiting) for w in beat.workers]


async def test_plugin_figures_over_http(nursery):
    queen = await start_queen(nursery, history={"fine_step_s": 0.2})
    beat = heartbeat("a", [worker("w", metrics={"ctxsw.procs": 7.0})])
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        params = {"metric": "ctxsw.procs", "since": 2}
        refused = await client.get("/v1/history", params=params)
        assert refused.status_code == 400 and "unknown metric(s): ctxsw.procs" in \
            refused.json()["message"]  # nothing of it held yet
        await post_heartbeat(client, queen, beat)
        with trio.fail_after(5):  # until the queen has recorded it (on its own, every 0.2 s)
            while True:
                response = await client.get("/v1/history", params=params)
                if response.status_code == 200 and any(
                        7.0 in s["values"] for s in response.json()["series"]):
                    break
                await trio.sleep(0.05)
    [series] = msgspec.json.decode(response.content)["series"]
    assert (series["hive"], series["instance"], series["metric"]) == ("a", "w", "ctxsw.procs")


async def test_the_budget_and_what_it_refused_are_on_metrics(nursery):
    """A queen whose ``max_bytes`` holds one worker: the second worker's series are refused,
    counted on ``/metrics``, and queries answer the first as usual."""
    queen = await start_queen(nursery, history={"fine_step_s": 0.2, "max_bytes": 2**20,
                                                "fine_retention_s": 60, "coarse_retention_s": 60})
    row_bytes, per = queen.history.values.row_bytes, len(queen.history.worker_metrics)
    queen.history.budget.max_bytes = per * row_bytes  # one worker's series (the config's least
    # is 1 MiB, thousands of series: the budget is narrowed here, the config path is tested above)
    beat = heartbeat("a", [worker("first"), worker("second")])
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        await post_heartbeat(client, queen, beat)
        with trio.fail_after(5):
            while queen.history.refused == 0:
                await trio.sleep(0.05)
        text = (await client.get("/metrics")).text
        answer = (await client.get("/v1/history", params={"metric": "cpu_pct"})).json()
    assert per == 6 and f"rbee_queen_history_refused_series_total {per}.0" in text
    assert f"rbee_queen_history_bytes {per * row_bytes}.0" in text
    assert f"rbee_queen_history_series {per}.0" in text
    assert [s["instance"] for s in answer["series"]] == ["first"]


def test_a_hive_gone_from_the_registry_is_a_gap_while_refused_hives_still_report():
    """Hives refused whole by the budget are not gathered, but they are still told apart from
    the live ones: a recorded hive that leaves the registry is a gap from that step on."""
    settings = wide(max_bytes=2**20, fine_retention_s=60, coarse_retention_s=600)
    history = FleetHistory(settings)
    fits = 2**20 // history.values.row_bytes // 9
    big = record_of("big", [worker(f"w{i:04d}") for i in range(fits - 1)])
    small = record_of("small", [worker("w")])
    refused = [record_of(f"refused{i}", [worker("w"), worker("v")]) for i in range(3)]
    history.record([big, small, *refused], T0)
    assert history.refused == 3 * 2 * 9
    history.record([big, *refused], T0 + 1)  # "small" left the registry
    assert _values(history, "cpu_pct", 2, T0 + 1.5, hive="small") == {("small", "w"): [12.5,
                                                                                      None]}


def test_a_hive_refused_whole_is_kept_while_it_reports_and_tried_again_once_rows_are_freed():
    settings = wide(max_bytes=2**20, fine_retention_s=60, coarse_retention_s=600)
    history = FleetHistory(settings)
    fits = 2**20 // history.values.row_bytes // 9
    big = record_of("big", [worker(f"w{i:04d}") for i in range(fits)])
    late = record_of("late", [worker("w")])
    history.record([big, late], T0)
    assert history.refused == 9
    history.record([late], T0 + 1)  # "big" left the registry
    history.forget_old(T0 + 300)
    assert history.refused == 9 and "late" in history.hives  # it still reports: not dropped
    history.forget_old(T0 + 602)  # "big" is forgotten: its rows are free
    history.record([late], T0 + 603)
    assert history.refused == 9 and len(history) == 9
    assert _values(history, "cpu_pct", 1, T0 + 603.5) == {("late", "w"): [12.5]}


async def test_a_queen_records_the_hives_its_redis_mirror_follows(nursery, tmp_path):
    """With the redis store, a heartbeat posted to queen A reaches queen B's registry through
    its mirror, which notes it to B's history like a heartbeat B took itself."""
    with running_redis(tmp_path) as redis:
        store = {"kind": "redis", "url": redis.url, "key_prefix": f"h{time.time_ns()}"}
        settings = {"registry": {"store": store}, "history": {"fine_step_s": 0.2}}
        a = await start_queen(nursery, **settings)
        b = await start_queen(nursery, **settings)
        async with httpx.AsyncClient(timeout=5) as client:
            await post_heartbeat(client, a, heartbeat("x", [worker("w", cpu_pct=42.0)]))

            async def recorded() -> bool:
                answer = (await client.get(f"{url_of(b)}/v1/history",
                                           params={"metric": "cpu_pct", "since": 2})).json()
                return any(42.0 in s["values"] for s in answer["series"] if s["hive"] == "x")

            await wait_for(recorded, timeout=10)
        a.stop()
        b.stop()
        await a.stopped.wait()
        await b.stopped.wait()


async def test_a_queen_shows_a_new_hive_within_a_tick_not_a_fine_step(nursery):
    """A queen stepping every 10 minutes still answers a hive that just arrived within about a
    second (its tick records hives seen for the first time into the current point)."""
    queen = await start_queen(nursery, history={"fine_step_s": 600, "fine_retention_s": 3600,
                                                "coarse_step_s": 3600})

    async def stepped() -> bool:
        return queen.history._index >= 0  # its first step is done: the hive comes after

    await wait_for(stepped, timeout=10)
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        await post_heartbeat(client, queen, heartbeat("late", [worker("w", cpu_pct=7.0)]))

        async def recorded() -> bool:
            answer = (await client.get("/v1/history",
                                       params={"metric": "cpu_pct", "since": 600})).json()
            return [s["values"] for s in answer["series"]] == [[7.0]]

        await wait_for(recorded, timeout=10)
