"""The queen's built-in history: the rings (gaps, retention, float16 precision), the queries
(selectors, aligned columns, steps, windows) and ``GET /v1/history`` on a real server, bad input
included. Time is passed in explicitly, so every column is known in advance."""

from __future__ import annotations

import math
import time

import httpx
import msgspec
import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rbee.config import HistorySettings
from rbee.contract import HiveRecord
from rbee.queen.history import FleetHistory, QueryError, Selector
from rbee.queen.history.columns import BLOCK, Budget, Codec, Store, Tier
from rbee.queen.history.figures import GPU_METRICS, WORKER_METRICS

from .builders import GIB, gpu, heartbeat, worker
from .queenkit import post_heartbeat, start_queen, url_of

T0 = 1_800_000_000.0  # a whole multiple of 300: fine and coarse columns line up
WIDE = dict(fine_step_s=1.0, fine_retention_s=900.0, coarse_step_s=10.0,
            coarse_retention_s=21600.0, max_bytes=256 * 2**20,
            worker_metrics=list(WORKER_METRICS), gpu_metrics=list(GPU_METRICS))
"""Every figure, at 1 s for 15 minutes and 10 s for 6 hours: the tiers these tests count in."""


def wide(**changes) -> HistorySettings:
    return HistorySettings(**(WIDE | changes))


def record_of(hive_id: str, workers, gpus=(), stale: bool = False) -> HiveRecord:
    beat = heartbeat(hive_id, workers, gpus)
    return HiveRecord(info=beat.hive, workers=beat.workers, gpus=beat.capabilities, stale=stale)


def _tier(slots: int) -> tuple[Tier, Codec]:
    codec = Codec(np.float16)
    tier = Tier(slots, codec.raw)
    tier.grow(1)
    return tier, codec


def _put(tier: Tier, codec: Codec, index: int, value: float) -> None:
    """``value`` in row 0 at ``index``, every other row NaN (a column as a step writes it)."""
    column = np.full(BLOCK, np.nan)
    column[0] = value
    tier.put(index, codec.encode(column))


def _row0(tier: Tier, codec: Codec, first: int, last: int) -> list[float]:
    return codec.decode(tier.read(first, last, np.array([0])))[0].tolist()


def test_tier_keeps_the_newest_points_and_leaves_gaps_empty():
    tier, codec = _tier(5)
    for index in (3, 4, 5, 8, 9):
        _put(tier, codec, index, float(index))
    values = _row0(tier, codec, 3, 10)  # the ring holds 5..9; 6 and 7 were never written
    assert math.isnan(values[0]) and math.isnan(values[1])  # 3 and 4: older than it holds
    assert values[2] == 5.0 and math.isnan(values[3]) and math.isnan(values[4])
    assert values[5:7] == [8.0, 9.0] and math.isnan(values[7])
    _put(tier, codec, 20, 1.0)  # far ahead: everything older is gone
    assert all(math.isnan(v) for v in _row0(tier, codec, 5, 19))
    assert _row0(tier, codec, 20, 20) == [1.0]
    _put(tier, codec, 3, 7.0)  # older than the ring holds: ignored
    assert all(math.isnan(v) for v in _row0(tier, codec, 3, 3))


@given(st.integers(1, 12), st.lists(st.tuples(st.integers(-15, 15), st.integers(0, 99)),
                                    max_size=40))
def test_tier_matches_a_model_of_the_newest_points(slots, moves):
    """Against a dict of every point put: the tier answers the point last put at each index
    within its newest ``slots``, NaN elsewhere (gaps cleared in slices, not point by point)."""
    (tier, codec), points, now = _tier(slots), {}, 1000
    for delta, value in moves:
        now += delta
        _put(tier, codec, now, float(value))
        newest = max(points, default=now)
        if now > newest - slots:
            points[now] = float(value)
        last = max(points)
        expected = [points.get(i, math.nan) if i > last - slots else math.nan
                    for i in range(last - 20, last + 3)]
        got = _row0(tier, codec, last - 20, last + 2)
        assert [None if math.isnan(v) else v for v in got] == [
            None if math.isnan(v) else v for v in expected]


def test_a_new_block_and_a_freed_row_read_as_nan_without_a_fill():
    """Raw points are the float's bits XOR NaN's: zero pages are NaN, so new blocks come from
    ``np.zeros`` and a freed row is zeroed; float16 ends at 65,504 (larger is clipped)."""
    codec = Codec(np.float16)
    assert math.isnan(codec.decode(np.zeros(1, codec.raw))[0])
    assert codec.decode(codec.encode(np.array([1e9, -1e9, 0.0, 51.0]))).tolist() == [
        65504.0, -65504.0, 0.0, 51.0]
    store = Store(codec, 10, 4, Budget(2**20))
    first = store.allocate(9)
    store.current[first:first + 9] = codec.encode(np.arange(9.0))
    store.step(0)
    store.release(first, 9)
    assert store.allocate(9) == first  # reused, and all NaN again
    assert np.isnan(codec.decode(store.fine.read(0, 0, np.arange(first, first + 9)))).all()


def test_recording_a_new_fleet_costs_no_ring_sweep():
    """6,000 new series at once (1,000 workers) are recorded in well under a second: a new ring
    is NaN already, so nothing is cleared (point by point, this took 18 s on the test machine
    and stalled the queen's whole event loop)."""
    history = FleetHistory(wide())
    workers = [worker(f"w{i}", gpu_indices=[0]) for i in range(1000)]
    started = time.perf_counter()
    history.record([record_of("hive-a", workers)], T0)
    assert time.perf_counter() - started < 1.0
    assert len(history) == 9000  # nine rows a worker, its engine's three never known
    engine = history.query(Selector(metrics=frozenset({"engine_running"})), 1, None, T0 + 0.5)
    cpu = history.query(Selector(metrics=frozenset({"cpu_pct"})), 1, None, T0 + 0.5)
    assert engine.series == [] and len(cpu.series) == 1000  # a figure never known: no series


def test_fine_columns_with_gaps_for_stale_hives_and_none_for_unknown():
    history = FleetHistory(wide())
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

    history = FleetHistory(wide())
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
    history = FleetHistory(wide())
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
    history = FleetHistory(wide(fine_retention_s=60, coarse_retention_s=600))
    history.record([record_of("a", [worker("w")])], T0)
    answer = history.query(Selector(), 10**9, 1, T0 + 0.5)
    assert answer.step == 10.0 and len(answer.timestamps) == 60
    assert answer.adjusted == ["since: history goes back 600 s; 1e+09 s asked",
                               "step: 10 s is the finest kept for the last 600 s; 1 s asked"]


def test_gpu_series_by_uuid_or_index_and_selectors():
    history = FleetHistory(wide())
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


def test_series_past_the_byte_budget_are_refused_and_freed_rows_reused():
    settings = wide(max_bytes=2**20, fine_retention_s=60, coarse_retention_s=600,
                               max_series_per_query=4)
    history = FleetHistory(settings)
    fits = 2**20 // history.values.row_bytes // 9  # workers that fit: 9 rows of 760 bytes each
    workers = [worker(f"w{i:04d}", gpu_indices=[0]) for i in range(fits + 5)]
    history.record([record_of("a", workers)], T0)
    assert len(history) == fits * 9 and history.refused == 5 * 9
    assert history.budget.used == fits * 9 * history.values.row_bytes <= settings.max_bytes
    with pytest.raises(QueryError, match=rf"{fits * 9} series match, more than history.max_"
                                         r"series_per_query \(4\): narrow the query"):
        history.query(Selector(), 60, None, T0)  # held ones, known or not; refused ones not
    late = history.query(Selector(instance=workers[-1].instance), 60, None, T0 + 0.5)
    assert late.series == []  # not recorded: counted in ``refused``, not an error
    history.record([record_of("a", workers[:1])], T0 + 1)  # the others left the hive
    assert history.forget_old(T0 + 600) == 0  # not yet: 599 s since they left
    assert history.forget_old(T0 + 602) == (fits - 1) * 9 and len(history) == 9
    history.record([record_of("a", workers[:1]), record_of("b", [worker("late")])], T0 + 2)
    assert history.refused == 5 * 9 and len(history) == 18  # a freed run reused: no new bytes
    assert history.budget.used == fits * 9 * history.values.row_bytes
    answer = history.query(Selector(metrics=frozenset({"cpu_pct"})), 3, None, T0 + 2.5)
    assert [(s.hive, s.instance, s.values) for s in answer.series] == [
        ("a", "w0000", [12.5, 12.5, 12.5]), ("b", "late", [None, None, 12.5])]


def test_a_silent_hive_leaves_a_gap_and_is_forgotten_whole():
    history = FleetHistory(wide(fine_retention_s=60, coarse_retention_s=600))
    gpus = [gpu(0, total_gib=80, used_gib=10)]
    history.record([record_of("a", [worker("w", gpu_indices=[0])], gpus)], T0)
    history.record([], T0 + 1)  # gone from the registry: a gap from now on
    answer = history.query(Selector(metrics=frozenset({"cpu_pct", "util_pct"})), 2, None,
                           T0 + 1.5)
    assert [(s.metric, s.values) for s in answer.series] == [("util_pct", [0.0, None]),
                                                             ("cpu_pct", [12.5, None])]
    assert history.forget_old(T0 + 600) == 0
    assert history.forget_old(T0 + 602) == 9 + 5 and len(history) == 0 and not history.hives


def test_old_max_series_key_is_refused_naming_max_bytes():
    from rbee import ConfigError
    from rbee.config import QueenConfig, parse_config

    with pytest.raises(ConfigError, match=r"history.max_series is no longer used: history is "
                                          r"bounded in bytes by history.max_bytes"):
        parse_config({"history": {"max_series": 1000}}, QueenConfig, "queen.yaml")
    with pytest.raises(ConfigError, match="its step a whole multiple of the fine one"):
        parse_config({"history": {"fine_step_s": 3, "coarse_step_s": 10}}, QueenConfig, "q.yaml")
    with pytest.raises(ConfigError, match=r"history.worker_metrics: cpu in \['cpu'\]; known: "
                                          r"cpu_pct, rss_mb, io_r_mb_s"):
        parse_config({"history": {"worker_metrics": ["cpu"]}}, QueenConfig, "q.yaml")
    with pytest.raises(ConfigError, match=r"history\.gpu_metrics: a metric named twice"):
        parse_config({"history": {"gpu_metrics": ["power_w", "power_w"]}}, QueenConfig, "q.yaml")


def test_history_memory_per_series():
    """2 bytes a point: 1,800 bytes for 15 minutes at 1 s (120 per series-minute), 4,320 for 6 h
    at 10 s, plus its current value and known flag; memory is taken in blocks of rows."""
    history = FleetHistory(wide())
    assert history.values.row_bytes == 1800 + 4320 + 2 + 1
    assert history.plugins.row_bytes == 2 * (1800 + 4320 + 2) + 1
    history.record([record_of("a", [worker("w")])], T0)
    fine, coarse = history.values.fine.blocks[0], history.values.coarse.blocks[0]
    assert fine.shape == (900, BLOCK) and fine.dtype == np.uint16 and coarse.shape == (2160, BLOCK)
    assert len(history.values.fine.blocks) == 1 and history.budget.used == 9 * 6123


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
    ({"metric": "temperature_c"}, "unknown metric(s): temperature_c"),  # not kept by default
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
        "step: 300 s is the finest kept for the last 21600 s; 0.001 s asked"]
