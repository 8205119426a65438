"""The worker table's layout, shared by ``rbee workers`` and both views of ``rbee top``: it fits
any width by dropping columns by priority (never wrapping), shows plugin figures on request, and
marks saturated figures and sick workers for the interactive view's colours."""

from __future__ import annotations

import pytest

from rbee.columns import BAD, OK, WARN, Row, fit, metric_column, parse_keys, with_metrics
from rbee.contract import (
    Degraded,
    EngineState,
    Healthy,
    HiveStaleEvent,
    HiveTelemetryEvent,
    Unhealthy,
    WorkerState,
    utc_now,
)
from rbee.fleetview import FleetView
from rbee.terminal import WORKER_COLUMNS, count, table

from .builders import gpu, worker

LONG = "a-model-name-far-longer-than-its-column-" * 3


def busy_view() -> FleetView:
    view = FleetView()
    view.apply(HiveTelemetryEvent(
        hive_id="gpu-hive-with-a-long-name", timestamp=utc_now(),
        capabilities=[gpu(0, total_gib=80, used_gib=60, util_pct=90.0)],
        workers=[worker("w1", model=LONG, gpu_util_pct=90.0, gpu_indices=[0], vram_mb=60 * 1024,
                        total_vram_mb=80 * 1024, metrics={"ctxsw.procs": 3.0},
                        engine=EngineState(engine="vllm", requests_running=3,
                                           requests_waiting=2, kv_cache_pct=50.0)),
                 worker("w2", state=WorkerState.CRASHLOOP, restarts=7)]))
    view.apply(HiveStaleEvent(hive_id="gpu-hive-with-a-long-name", silent_s=9.0,
                              timestamp=utc_now()))
    return view


@pytest.mark.parametrize("width", [30, 60, 80, 100, 120, 160, 200, 260])
def test_every_line_fits_the_width(width):
    columns = with_metrics(WORKER_COLUMNS, ["ctxsw.procs"])
    text = busy_view().render(width, columns)
    assert max(len(line) for line in text.splitlines()) <= width
    lines = text.splitlines()
    header = lines[1]
    assert header.startswith("HIVE") and "GROUP/INSTANCE" in header  # always shown
    rows = [line for line in lines if "llm/w" in line]
    assert len(rows) == 2  # one line per worker


def test_wider_terminals_show_more_and_drop_by_priority():
    shown_at = {width: [c.title for c, _ in fit(WORKER_COLUMNS, width)] for width in range(30, 300)}
    for width in range(31, 300):
        assert set(shown_at[width - 1]) <= set(shown_at[width]), width  # never fewer
    assert "PID" not in shown_at[160] and "PID" in shown_at[299]  # the lowest priority
    assert shown_at[100][:2] == ["HIVE", "GROUP/INSTANCE"] and "GPU%" in shown_at[100]
    assert [c.title for c, _ in fit(WORKER_COLUMNS, None)] == [c.title for c in WORKER_COLUMNS]
    (last, width), = fit(WORKER_COLUMNS, 300)[-1:]
    assert last.title == "NOTE" and width > 12  # the rest of the line


def test_cut_cells_say_so():
    text = table([Row("h", worker("w", model=LONG), False)], width=100)
    assert "a-model-name-…" in text and LONG not in text
    noted = [Row("h", worker("w"), False, note=LONG)]
    assert LONG in table(noted)  # no width: NOTE, the last column, whole
    assert LONG not in table(noted, width=200) and "…" in table(noted, width=200)


def test_plugin_columns_show_the_figure_or_a_dash():
    assert parse_keys(" ctxsw.procs,,oom.kills,ctxsw.procs ") == ["ctxsw.procs", "oom.kills"]
    with pytest.raises(ValueError, match="'ctx procs' is no plugin metric key"):
        parse_keys("ctxsw.procs,ctx procs")
    column = metric_column("ctxsw.procs")
    assert column.cell(Row("h", worker("w", metrics={"ctxsw.procs": 12345.678}), False)) == "1.235e+04"
    assert column.cell(Row("h", worker("w", metrics={"ctxsw.procs": 3.0}), False)) == "3"
    assert column.cell(Row("h", worker("w"), False)) == "-"  # none reported: not 0
    columns = with_metrics(WORKER_COLUMNS, ["ctxsw.procs"])
    assert [c.title for c in columns][-2:] == ["ctxsw.procs", "NOTE"]


def test_levels_mark_saturation_and_sick_workers():
    by_title = {c.title: c for c in WORKER_COLUMNS}

    def level(title: str, **fields) -> int:
        stale = fields.pop("stale", False)
        return by_title[title].level(Row("h", worker("w", **fields), False, stale=stale))

    def engine(waiting: int, kv: float | None) -> EngineState:
        return EngineState(engine="vllm", requests_running=1, requests_waiting=waiting,
                           kv_cache_pct=kv)

    assert [level("KV%", engine=engine(0, kv)) for kv in (50.0, 85.0, 96.0, None)] == \
        [OK, WARN, BAD, OK]
    assert [level("QUEUE", engine=engine(n, None)) for n in (0, 3, 12)] == [OK, WARN, BAD]
    assert level("GPU%", gpu_util_pct=99.0, gpu_indices=[0]) == BAD
    assert level("STATE", state=WorkerState.CRASHLOOP) == BAD
    assert level("STATE", state=WorkerState.BACKOFF) == WARN
    assert level("HIVE", stale=True) == WARN and level("HIVE") == OK


def test_a_sick_hive_marks_its_rows():
    view = FleetView()
    for hive, health in (("ok", Healthy()), ("meh", Degraded(reason="GPU 1 degraded")),
                         ("sick", Unhealthy(reason="GPU 0 fell off the bus"))):
        view.apply(HiveTelemetryEvent(hive_id=hive, timestamp=utc_now(), health_status=health,
                                      workers=[worker("w")]))
    hive_column = WORKER_COLUMNS[0]
    assert {row.hive: hive_column.level(row) for row in view.rows()} == \
        {"ok": OK, "meh": WARN, "sick": BAD}


def test_counts_are_singular_or_plural():
    assert [count(n, "worker") for n in (0, 1, 2)] == ["0 workers", "1 worker", "2 workers"]
    view = busy_view()
    assert view.header().startswith("1 hive (1 stale), 2 workers")
    assert view.header(shown=1).startswith("1 hive (1 stale), 1 of 2 workers")
