"""The queen's built-in history: the rings (gaps, retention, float16 precision), the queries
(selectors, aligned columns, steps, windows) and ``GET /v1/history`` on a real server, bad input
included. Time is passed in explicitly, so every column is known in advance."""

from __future__ import annotations

import math
import time

import httpx
import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rbee.config import HistorySettings
from rbee.contract import HiveRecord
from rbee.queen.history import FleetHistory, QueryError, Ring, Selector

from .builders import GIB, gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of

T0 = 1_800_000_000.0  # a whole multiple of 10: fine and coarse columns line up


def record_of(hive_id: str, workers, gpus=(), stale: bool = False) -> HiveRecord:
    beat = heartbeat(hive_id, workers, gpus)
    return HiveRecord(info=beat.hive, workers=beat.workers, gpus=beat.capabilities, stale=stale)


def test_ring_keeps_the_newest_points_and_leaves_gaps_empty():
    ring = Ring(5)
    for index in (3, 4, 5, 8, 9):
        ring.put(index, float(index))
    values = ring.read(3, 10)  # the ring holds 5..9; 6 and 7 were never written
    assert math.isnan(values[0]) and math.isnan(values[1])  # 3 and 4: older than it holds
    assert values[2] == 5.0 and math.isnan(values[3]) and math.isnan(values[4])
    assert values[5:7] == [8.0, 9.0] and math.isnan(values[7])
    ring.put(20, 1.0)  # far ahead: everything older is gone
    assert all(math.isnan(v) for v in ring.read(5, 19)) and ring.read(20, 20) == [1.0]
    ring.put(3, 7.0)  # older than the ring holds: ignored
    assert all(math.isnan(v) for v in ring.read(3, 3))


@given(st.integers(1, 12), st.lists(st.tuples(st.integers(-15, 15), st.integers(0, 99)),
                                    max_size=40))
def test_ring_matches_a_model_of_the_newest_points(slots, moves):
    """Against a dict of every point put: the ring answers the point last put at each index
    within its newest ``slots``, NaN elsewhere (gaps cleared in slices, not point by point)."""
    ring, points, now = Ring(slots), {}, 1000
    for delta, value in moves:
        now += delta
        ring.put(now, float(value))
        newest = max(points, default=now)
        if now > newest - slots:
            points[now] = float(value)
        last = max(points)
        expected = [points.get(i, math.nan) if i > last - slots else math.nan
                    for i in range(last - 20, last + 3)]
        got = ring.read(last - 20, last + 2)
        assert [None if math.isnan(v) else v for v in got] == [
            None if math.isnan(v) else v for v in expected]


def test_recording_a_new_fleet_costs_no_ring_sweep():
    """6,000 new series at once (1,000 workers) are recorded in well under a second: a new ring
    is NaN already, so nothing is cleared (point by point, this took 18 s on the test machine
    and stalled the queen's whole event loop)."""
    history = FleetHistory()
    workers = [worker(f"w{i}", gpu_indices=[0]) for i in range(1000)]
    started = time.perf_counter()
    history.record([record_of("hive-a", workers)], T0)
    assert time.perf_counter() - started < 1.0
    assert len(history) == 6000


def test_fine_columns_with_gaps_for_stale_hives_and_none_for_unknown():
    history = FleetHistory()
    for second in range(10):
        busy = worker("w", cpu_pct=10.0 * second, gpu_util_pct=50.0 if second < 3 else None,
                      rss_mb=4 * GIB)
        history.record([record_of("a", [busy], stale=second in (4, 5))], T0 + second)
    answer = history.query(Selector(metrics=frozenset({"cpu_pct", "gpu_util_pct", "rss_mb"})),
                           10, None, T0 + 9.5)
    assert answer.step == 1.0 and answer.timestamps == [T0 + s for s in range(10)]
    cpu, gpu_util, rss = answer.series  # sorted by key
    assert (cpu.metric, gpu_util.metric, rss.metric) == ("cpu_pct", "gpu_util_pct", "rss_mb")
    assert cpu.values == [0.0, 10.0, 20.0, 30.0, None, None, 60.0, 70.0, 80.0, 90.0]
    assert gpu_util.values == [50.0] * 3 + [None] * 7  # unknown is never 0
    assert rss.values[0] == 4096.0  # MiB in, GiB stored, MiB out
    assert (cpu.hive, cpu.group, cpu.instance) == ("a", "llm", "w")


def test_engine_figures_where_known():
    from rbee.contract import EngineState

    history = FleetHistory()
    for second in range(3):
        engine = EngineState(engine="vllm", requests_running=2, requests_waiting=second,
                             kv_cache_pct=40.0 + second)
        history.record([record_of("a", [worker("llm", engine=engine), worker("plain")])],
                       T0 + second)
    answer = history.query(Selector(metrics=frozenset({"engine_waiting", "kv_cache_pct"})), 3,
                           None, T0 + 2.5)
    by = {(s.instance, s.metric): s.values for s in answer.series}
    assert by[("llm", "engine_waiting")] == [0.0, 1.0, 2.0]
    assert by[("llm", "kv_cache_pct")] == [40.0, 41.0, 42.0]
    assert ("plain", "kv_cache_pct") not in by  # never known: no series at all


def test_coarser_steps_average_and_long_windows_use_the_coarse_tier():
    history = FleetHistory()
    for second in range(40):
        history.record([record_of("a", [worker("w", cpu_pct=float(second))])], T0 + second)
    now = T0 + 39.5
    by_5 = history.query(Selector(metrics=frozenset({"cpu_pct"})), 20, 5, now)
    assert by_5.step == 5.0 and by_5.series[0].values == [22.0, 27.0, 32.0, 37.0]
    hour = history.query(Selector(metrics=frozenset({"cpu_pct"})), 3600, None, now)
    assert hour.step == 10.0 and len(hour.timestamps) == 360
    assert hour.series[0].values[-4:] == [4.5, 14.5, 24.5, 34.5]  # 10 s averages
    assert hour.adjusted == []


def test_step_finer_than_stored_and_window_past_retention_are_adjusted_and_said():
    history = FleetHistory(HistorySettings(fine_retention_s=60, coarse_retention_s=600))
    history.record([record_of("a", [worker("w")])], T0)
    answer = history.query(Selector(), 10**9, 1, T0 + 0.5)
    assert answer.step == 10.0 and len(answer.timestamps) == 60
    assert answer.adjusted == ["since: history goes back 600 s; 1e+09 s asked",
                               "step: 10 s is the finest kept for the last 600 s; 1 s asked"]


def test_gpu_series_by_uuid_or_index_and_selectors():
    history = FleetHistory()
    gpus = [msgspec.structs.replace(gpu(i, total_gib=80, used_gib=10 + i), temperature_c=50.0 + i)
            for i in range(2)]
    history.record([record_of("a", [worker("w1"), worker("w2", group="embed")], gpus),
                    record_of("b", [worker("w1")])], T0)
    now = T0 + 0.5
    by_index = history.query(Selector(hive="a", gpu="1", metrics=frozenset({"temperature_c"})),
                             1, None, now)
    [series] = by_index.series
    assert (series.gpu, series.gpu_index, series.values) == ("GPU-00000001", 1, [51.0])
    assert [s.gpu_index for s in history.query(Selector(gpu="GPU-00000000"), 1, None, now).series
            ] == [0] * 3  # util, VRAM, temperature (no power or memory figure: no series)
    workers = history.query(Selector(instance="w1", metrics=frozenset({"cpu_pct"})), 1, None, now)
    assert [(s.hive, s.instance) for s in workers.series] == [("a", "w1"), ("b", "w1")]
    assert history.query(Selector(group="embed", gpu="0"), 1, None, now).series == []


def test_series_are_capped_and_forgotten():
    history = FleetHistory(HistorySettings(max_series=8, fine_retention_s=60, coarse_retention_s=600,
                                           max_series_per_query=4))
    history.record([record_of("a", [worker("w1", gpu_indices=[0]), worker("w2", gpu_indices=[0])])],
                   T0)  # 2 x 6 series (no engine: no engine series)
    assert len(history) == 8 and history.refused == 2 * 6 - 8
    with pytest.raises(QueryError, match=r"8 series match, more than history.max_series_per_"
                                         r"query \(4\): narrow the query"):
        history.query(Selector(), 60, None, T0)
    assert history.forget_old(T0 + 599) == 0
    assert history.forget_old(T0 + 601) == 8 and len(history) == 0


def test_history_memory_per_series():
    """2 bytes a point: 1,800 bytes for 15 minutes at 1 s (120 per series-minute), 4,320 for 6 h
    at 10 s."""
    history = FleetHistory()
    history.record([record_of("a", [worker("w")])], T0)
    series = next(iter(history._series.values()))
    assert (len(series.fine.data), len(series.coarse.data)) == (1800, 4320)
    assert len(series.fine.data) / 15 == 120


@pytest.fixture
async def queen(nursery):
    return await start_queen(nursery, history={"fine_step_s": 0.2})


async def _recorded(client: httpx.AsyncClient) -> list[float | None]:
    answer = (await client.get("/v1/history", params={"metric": "cpu_pct", "since": 2})).json()
    return [v for series in answer["series"] for v in series["values"]]


async def test_history_over_http(queen):
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        for cpu in (10.0, 20.0, 30.0):
            await post_heartbeat(client, queen, heartbeat("a", [worker("w", cpu_pct=cpu)]))
            with trio.fail_after(5):  # until the queen has recorded it (on its own, every 0.2 s)
                while cpu not in await _recorded(client):
                    await trio.sleep(0.05)
        response = await client.get("/v1/history", params={"metric": "cpu_pct", "since": 2,
                                                              "instance": "w"})
        assert response.status_code == 200, response.text
        answer = response.json()
        [series] = answer["series"]
        assert answer["step"] == 0.2 and len(answer["timestamps"]) == len(series["values"]) == 10
        assert {10.0, 20.0, 30.0} <= {v for v in series["values"] if v is not None}
        assert answer["timestamps"][-1] <= time.time()


@pytest.mark.parametrize(("params", "message"), [
    ({"metric": "cpu_pct,bogus"}, "unknown metric(s): bogus; known: cpu_pct,"),
    ({"metric": ""}, "unknown metric(s): (none)"),
    ({"since": "yesterday"}, "query parameter 'since' must be a number, not 'yesterday'"),
    ({"since": "-5"}, "query parameter 'since' must be >= 0, not '-5'"),
    ({"step": "nan"}, "query parameter 'step' must be >= 0, not 'nan'"),
    ({"step": "0"}, "query parameter 'step' must be > 0, not '0'"),
    ({"hive": "a", "node": "x"}, "unknown query parameter(s): node; known: gpu, group, hive,"),
])
async def test_bad_history_queries_are_4xx_naming_the_parameter(queen, params, message):
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        response = await client.get("/v1/history", params=params)
    assert response.status_code == 400
    assert message in response.json()["message"]


async def test_huge_since_gives_what_exists_with_its_bounds(queen):
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5) as client:
        response = await client.get("/v1/history", params={"since": "1e308", "step": "0.001"})
    assert response.status_code == 200
    assert response.json()["adjusted"] == [
        "since: history goes back 21600 s; 1e+308 s asked",
        "step: 10 s is the finest kept for the last 21600 s; 0.001 s asked"]
