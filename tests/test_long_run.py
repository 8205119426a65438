"""Two minutes of a real fleet, as an operator leaves it running: a real ``rbee-queen`` and
``rbee-hive``, and real workers in cgroups: a demo vLLM engine, a CPU burner under a 20 % limit,
a worker that crashes at start, and one that its memory limit gets OOM-killed. The checks are
the operator's: no heartbeat is lost (the queen's body deadline is short, so a keep-alive
connection lives through dozens of them), CPU % never reads above a limit, crash loops and OOM
kills are visible, and what the stream, the API, ``/metrics``, ``rbee workers`` and the dashboard
say of each worker is one figure.

``RBEE_SOAK_S`` sets the length (120 s by default); it runs in the slow lane of ``./dev test``.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import httpx
import msgspec
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rbee.contract import (
    STREAM_EVENT_NAME,
    HiveState,
    HiveTelemetryEvent,
    WorkerState,
    WorkerTelemetry,
    decode_stream_event,
)

from .browserkit import CONNECTION, WORKER_KEYS, chromium, console_errors, wait_for
from .conftest import IS_ROOT, RUN_ROOT, V1_MOUNTS, V2_MOUNT
from .daemons import BIN, Daemon
from .queenkit import open_stream

pytestmark = pytest.mark.skipif(
    not (IS_ROOT and ("memory" in V1_MOUNTS or V2_MOUNT is not None)),
    reason="needs root and a memory cgroup controller (v1 or v2) for limits and OOM kills")

SOAK_S = float(os.environ.get("RBEE_SOAK_S", "120"))
INTERVAL = 0.5
HIVE = "soak"
PYTHON = sys.executable
BURNER_LIMIT_PCT = 20.0
CRASH_LINE = "fatal: no model at /models/missing"
WORKERS = [
    {"group": "llm", "instance": "llama", "cpu_limit": "50%", "memory_limit": "256M",
     # -u: not `python -m rbee.demo.worker`, which test_cli.py counts as `rbee up`'s leftovers
     # (this test runs beside the suite, in the slow lane)
     "argv": [PYTHON, "-u", "-m", "rbee.demo.worker", "--model", "llama-3-8b", "--metrics-port",
              "{port}"],
     "metrics_url": "http://127.0.0.1:{port}/metrics"},
    {"group": "cpu", "instance": "burner", "cpu_limit": f"{BURNER_LIMIT_PCT:g}%",
     "argv": [PYTHON, "-c", "while True: pass"]},
    {"group": "crash", "instance": "flaky", "restart": "on-failure", "restart_backoff_s": 0.2,
     "restart_backoff_max_s": 2, "crashloop_after": 3,
     "argv": [PYTHON, "-c", f"import sys; print('loading', file=sys.stderr); "
                            f"print({CRASH_LINE!r}, file=sys.stderr); sys.exit(3)"]},
    {"group": "oom", "instance": "hog", "memory_limit": "48M", "restart": "always",
     "restart_backoff_s": 1, "restart_backoff_max_s": 4,
     "argv": [PYTHON, "-c", "import time\ntime.sleep(2)\nheap = []\n"
                            "while True:\n    heap.append(bytearray(4 << 20))\n    time.sleep(0.02)"]},
]
_hive_state = msgspec.json.Decoder(HiveState)


def configs(tmp_path) -> tuple[Daemon, Callable[[str], Daemon]]:
    queen = {"port": 0, "http": {"body_timeout_s": 3.0, "header_timeout_s": 3.0},
             "registry": {"stale_after_s": 5, "remove_after_s": 30, "cleanup_interval_s": 0.2},
             "stream": {"queen_interval_s": 1.0}}
    hive = {"id": HIVE, "port": 0, "stop_workers_on_exit": True,
            "cgroup": {"root": f"{RUN_ROOT}/soak"}, "collect": {"gpu": "none", "interval_s": INTERVAL},
            "heartbeat": {"interval_s": INTERVAL}, "workers": WORKERS}
    return (Daemon("rbee-queen", tmp_path / "queen.yaml", yaml.safe_dump(queen)),
            lambda url: Daemon("rbee-hive", tmp_path / "hive.yaml",
                               yaml.safe_dump({**hive, "queen_url": url}),
                               cgroup_root=f"{RUN_ROOT}/soak"))


async def follow(client: httpx.AsyncClient, url: str, seen: list[tuple[float, HiveTelemetryEvent]],
                 task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Every ``hive_telemetry`` event of the hive, with the time it arrived."""
    async with open_stream(client, url) as stream:
        task_status.started()
        while True:
            sse = await stream.next_raw(timeout=30)
            if sse.event != STREAM_EVENT_NAME:
                continue  # the keep-alive's ping
            event = decode_stream_event(sse.data)
            if isinstance(event, HiveTelemetryEvent) and event.hive_id == HIVE:
                seen.append((trio.current_time(), event))


async def views_of_one_heartbeat(client: httpx.AsyncClient, url: str,
                                 seen: list[tuple[float, HiveTelemetryEvent]]):
    """The stream's event, ``/v1/hives/soak``, ``/v1/workers`` and ``/metrics`` of one and the
    same heartbeat: read between two heartbeats (the hive's record unchanged before and after)."""
    for _ in range(100):
        before = _hive_state.decode((await client.get(f"{url}/v1/hives/{HIVE}")).content)
        listed = (await client.get(f"{url}/v1/workers")).json()
        metrics = (await client.get(f"{url}/metrics")).text
        after = _hive_state.decode((await client.get(f"{url}/v1/hives/{HIVE}")).content)
        await trio.sleep(0.05)  # the stream's copy of it is on its way
        streamed = [event for _, event in seen if event.timestamp == after.last_heartbeat]
        if before.last_heartbeat == after.last_heartbeat and streamed:
            return streamed[-1], after, listed, metrics
    raise AssertionError("no quiet moment between two heartbeats in 100 tries")


def steady_view(listed: list[dict]) -> dict[str, tuple[str, bool, int]]:
    """Each worker's state, idle flag and restart count, by ``group/instance``."""
    return {f"{found['worker']['group']}/{found['worker']['instance']}":
            (found["worker"].get("state", "running"), found["idle"],
             found["worker"].get("restarts", 0)) for found in listed}


async def cli_and_api_alike(client: httpx.AsyncClient, url: str
                            ) -> tuple[dict[str, tuple[str, bool]], dict[str, tuple[str, bool]]]:
    """``rbee workers``'s STATE and IDLE columns, and the API's, for each worker in a run of the
    command during which the API said the same of it before and after, restart count included:
    the crashing and the OOM-killed workers change every second or two (a restart between the
    two reads goes crashloop, starting, crashloop: the same state before and after, another in
    the command's view), so each worker is taken from a run where it held still, until every
    one has been."""
    in_cli: dict[str, tuple[str, bool]] = {}
    in_api: dict[str, tuple[str, bool]] = {}
    for _ in range(20):
        before = steady_view((await client.get(f"{url}/v1/workers")).json())
        cli = await trio.to_thread.run_sync(lambda: subprocess.run(
            [str(BIN / "rbee"), "workers", "--queen", url], capture_output=True, text=True,
            timeout=30))
        after = steady_view((await client.get(f"{url}/v1/workers")).json())
        assert cli.returncode == 0, cli.stderr
        header = cli.stdout.splitlines()[0]
        at = {name: header.index(name) for name in ("STATE", "MODEL", "IDLE", "UPTIME")}
        shown = {line.split()[1]: (line[at["STATE"]:at["MODEL"]].strip(),
                                   line[at["IDLE"]:at["UPTIME"]].strip() == "yes")
                 for line in cli.stdout.splitlines()[1:] if line.startswith(HIVE)}
        for name, (state, idle, _) in after.items():
            if before.get(name) == after[name]:
                in_cli[name], in_api[name] = shown.get(name), (state, idle)
        if len(in_api) == len(WORKERS):
            return in_cli, in_api
    raise AssertionError(f"only {sorted(in_api)} held still through a run of rbee workers, "
                         f"in 20 runs")


def key(worker: WorkerTelemetry) -> str:
    return f"{worker.group}/{worker.instance}"


def facts(worker: WorkerTelemetry) -> tuple:
    """What an operator acts on, as exact values."""
    ending = worker.last_exit
    return (worker.pid, str(worker.state), worker.restarts, worker.oom_kills, worker.cpu_pct,
            worker.rss_mb, None if ending is None else (ending.exit_code, ending.signal,
                                                          ending.oom_killed))


def metric_samples(text: str) -> dict[tuple[str, str], dict]:
    """Per (metric, group/instance), the sample's value (and labels for the state)."""
    found: dict[tuple[str, str], dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("hive") == HIVE and "instance" in sample.labels:
                where = f"{sample.labels['group']}/{sample.labels['instance']}"
                found[(sample.name, where)] = {"value": sample.value, **sample.labels}
    return found


async def test_two_minutes_of_a_real_fleet_every_figure_true(tmp_path):
    queen_daemon, hive_daemon = configs(tmp_path)
    seen: list[tuple[float, HiveTelemetryEvent]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        with queen_daemon as queen, hive_daemon(queen.url) as hive:
            async with trio.open_nursery() as nursery:
                await nursery.start(follow, client, queen.url, seen)
                await trio.sleep(SOAK_S)
                event, record, listed, metrics = await views_of_one_heartbeat(client, queen.url,
                                                                              seen)
                in_cli, in_api = await cli_and_api_alike(client, queen.url)
                health = (await client.get(f"{hive.url}/health")).json()
                with chromium(tmp_path) as driver:
                    driver.get(f"{queen.url}/")
                    wait_for(driver, CONNECTION, lambda text: text == "live")
                    shown = {}
                    for _ in range(20):  # the page and the queen at the same heartbeat
                        keys = driver.execute_script(WORKER_KEYS) or []
                        shown = {k: driver.execute_script(
                            f"return window.rbeeDashboard.cells({k!r})") for k in keys}
                        page_idle = driver.execute_script(
                            "return document.getElementById('s-idle').textContent")
                        settled = (await client.get(f"{queen.url}/v1/workers")).json()
                        if (len(shown) == len(WORKERS) and all(
                                shown[f"{HIVE}/{key(w)}"][12].split(" ")[0] == w.state
                                for w in msgspec.convert([s["worker"] for s in settled],
                                                         list[WorkerTelemetry]))
                                and page_idle == str(sum(s["idle"] for s in settled))):
                            break
                        await trio.sleep(0.3)
                    page_errors = console_errors(driver)
                nursery.cancel_scope.cancel()
            queen_log, hive_log = queen.stderr(), hive.stderr()

    # -- no heartbeat lost --------------------------------------------------------------------
    assert health["queen"]["failed"] == 0, health
    assert "not delivered" not in hive_log, hive_log[-2000:]
    assert "took longer than" not in queen_log, queen_log[-2000:]
    stamps = [e.timestamp for _, e in seen]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    # gaps by the heartbeats' own stamps: this process's arrival times stall while selenium
    # starts Chromium (a blocking call on this trio loop), which says nothing of the hive
    longest = max((b - a).total_seconds() for a, b in itertools.pairwise(stamps))
    assert longest < 4 * INTERVAL, f"a {longest:.2f} s gap in the hive's heartbeats"
    assert len(seen) >= 0.8 * SOAK_S / INTERVAL, len(seen)

    # -- CPU % never above a limit --------------------------------------------------------------
    samples = [(key(w), w) for _, e in seen for w in e.workers]
    over = [(k, w.cpu_pct, w.cpu_limit_pct) for k, w in samples
            if w.cpu_limit_pct is not None and w.rate_window_s > 0
            and w.cpu_pct > 1.2 * w.cpu_limit_pct + 2]
    assert over == [], over[:10]
    burner = [w.cpu_pct for k, w in samples if k == "cpu/burner" and w.rate_window_s > 0]
    assert max(burner) >= BURNER_LIMIT_PCT / 2, burner  # the limit is what holds it down
    print(f"burner under {BURNER_LIMIT_PCT:g} %: median {statistics.median(burner):.1f} %, "
          f"max {max(burner):.1f} % over {len(burner)} samples")

    # -- crash loops and OOM kills are visible --------------------------------------------------
    flaky = [w for k, w in samples if k == "crash/flaky"]
    assert {WorkerState.BACKOFF, WorkerState.CRASHLOOP} <= {w.state for w in flaky}
    last = flaky[-1]
    assert last.restarts >= 5 and last.last_exit is not None
    assert last.last_exit.exit_code == 3 and last.last_exit.stderr_tail[-1] == CRASH_LINE
    assert all(w.next_attempt_at is not None for w in flaky
               if w.state in (WorkerState.BACKOFF, WorkerState.CRASHLOOP))
    hog = [w for k, w in samples if k == "oom/hog"]
    assert hog[-1].oom_kills >= 2, [(w.state, w.oom_kills) for w in hog[-5:]]
    assert any(w.last_exit is not None and w.last_exit.oom_killed for w in hog)

    # -- one figure everywhere ------------------------------------------------------------------
    by_stream = {key(w): facts(w) for w in event.workers}
    assert {key(w): facts(w) for w in record.workers} == by_stream
    api = msgspec.convert([found["worker"] for found in listed], list[WorkerTelemetry])
    assert {key(w): facts(w) for w in api} == by_stream
    idle_api = sorted(key(w) for w, found in zip(api, listed, strict=True) if found["idle"])
    assert idle_api == sorted(event.idle) == sorted(record.idle)
    exposed = metric_samples(metrics)
    for worker in event.workers:
        where = key(worker)
        assert exposed[("rbee_worker_restarts_total", where)]["value"] == worker.restarts
        assert exposed[("rbee_worker_oom_kills_total", where)]["value"] == worker.oom_kills
        assert exposed[("rbee_worker_state", where)]["state"] == worker.state
        assert exposed[("rbee_worker_cpu_ratio", where)]["value"] == pytest.approx(
            worker.cpu_pct / 100)
    assert in_cli == in_api
    assert {k.removeprefix(f"{HIVE}/"): cells[12].split(" ")[0] for k, cells in shown.items()} \
        == {f"{s['worker']['group']}/{s['worker']['instance']}": s["worker"].get("state", "running")
            for s in settled}
    assert page_idle == str(sum(s["idle"] for s in settled))
    assert page_errors == []
