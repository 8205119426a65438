"""The fleet dashboard (``GET /``): its files and headers over HTTP, then the page itself in a real
Chromium against a real ``rbee-queen`` and ``rbee-hive`` with demo workers in cgroups.

The browser tests read the page's own model through ``window.rbeeDashboard`` (the rows it shows,
the time each render took) and its DOM; the fleet changes through the hive's API and real signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import threading
import time
from html.parser import HTMLParser
from importlib.resources import files

import httpx
import msgspec

from rbee.contract import EngineState, encode
from rbee.queen.dashboard import CONTENT_SECURITY_POLICY

from .browserkit import CONNECTION, WORKER_KEYS, chromium, console_errors, wait_for
from .builders import fleet_heartbeat
from .fakes import write_fake_nvidia_smi
from .queenkit import free_port, start_queen
from .test_end_to_end import demo_worker, hive, queen

STATIC = files("rbee.queen") / "static"
NOT_KNOWN = "\N{EN DASH}"
"""What the page shows for a figure the worker does not report."""
SCREENSHOTS = os.environ.get("RBEE_SCREENSHOT_DIR")
"""Where the browser tests also copy their screenshots (the README's one comes from here)."""


class _PageParts(HTMLParser):
    """The page's scripts, stylesheets and inline code, to hold it to its own CSP."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        if "style" in attributes or any(name.startswith("on") for name in attributes):
            self.inline.append(f"<{tag}> attribute")
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            if "src" in attributes:
                self.sources.append(attributes["src"])
            else:
                self._in_script = True
        if tag == "link" and "href" in attributes:
            self.sources.append(attributes["href"])

    def handle_endtag(self, tag) -> None:
        self._in_script = False

    def handle_data(self, data) -> None:
        if self._in_script and data.strip():
            self.inline.append("<script> body")


async def test_page_and_files_are_served_with_csp_and_cache_policy(nursery):
    queen_server = await start_queen(nursery)
    async with httpx.AsyncClient(base_url=queen_server.urls[0], timeout=5) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert "default-src 'self'" in CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert "unsafe-eval" not in CONTENT_SECURITY_POLICY
        parts = _PageParts()
        parts.feed(page.text)
        assert parts.inline == []  # the CSP would block them
        assert set(parts.sources) == {
            "/static/favicon.svg", "/static/vendor/uPlot.min.css", "/static/app.css",
            "/static/vendor/uPlot.iife.min.js", "/static/app.js"}
        for source in parts.sources:  # every one local, served, typed, with the same headers
            response = await client.get(source)
            assert response.status_code == 200, source
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            kind = source.rsplit(".", 1)[1]
            assert response.headers["content-type"].startswith(
                {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}[kind])
            vendored = source.startswith("/static/vendor/")
            assert response.headers["cache-control"] == (
                "public, max-age=86400" if vendored else "no-cache")
        assert (await client.get("/static/missing.js")).status_code == 404
        assert (await client.get("/static/../api.py")).status_code == 404
        assert (await client.post("/")).status_code == 405


def test_vendored_uplot_carries_its_licence_and_version():
    vendor = STATIC / "vendor"
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()
    assert "uplot@1.6.32" in (vendor / "README.md").read_text()
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")


# -- in the browser ---------------------------------------------------------------------------

FLEET = [demo_worker("llama", "llama-3-8b", env={"CUDA_VISIBLE_DEVICES": "0"},
                     endpoint="http://127.0.0.1:18000/v1"),
         demo_worker("qwen", "qwen-7b", env={"CUDA_VISIBLE_DEVICES": "1"}),
         demo_worker("bge", "bge-small", restart="never")]
FAST_COLLECT = {"gpu": "nvidia-smi", "interval_s": 0.25}


def gpu_env(tmp_path) -> dict[str, str]:
    """The hive's PATH with a fake ``nvidia-smi`` (two GPUs; this machine has none)."""
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir(exist_ok=True)
    write_fake_nvidia_smi(bin_dir)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def keys_of(tag: str, *instances: str) -> list[str]:
    return sorted(f"e2e-{tag}/llm/{instance}" for instance in instances)


def screenshot(driver, tmp_path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    if SCREENSHOTS:
        shutil.copy(path, os.path.join(SCREENSHOTS, name))


def test_dashboard_shows_the_live_fleet(tmp_path):
    """Every worker shown; one spawned through the hive's API appears within 1 s, one killed
    stays listed as exited until deleted; GPU cards, sorting, filtering, the keyboard-opened
    worker panel with its charts, light and dark; no console error."""
    with queen(tmp_path) as q, \
            hive(tmp_path, "dash", q.url, FLEET, env=gpu_env(tmp_path), collect=FAST_COLLECT) as h, \
            chromium(tmp_path) as driver, httpx.Client(timeout=10) as client:
        driver.get(f"{q.url}/")
        wait_for(driver, WORKER_KEYS, lambda keys: keys == keys_of("dash", "bge", "llama", "qwen"))
        assert driver.execute_script(CONNECTION) == "live"
        cards = driver.execute_script(
            "return [...document.querySelectorAll('#gpus .card')].map(c => c.textContent)")
        assert len(cards) == 2 and all("healthy" in card and "e2e-dash" in card for card in cards)
        assert wait_for(driver, "return document.getElementById('s-workers').textContent",
                        lambda text: text == "3") == "3"

        response = client.post(f"{h.url}/v1/workers", json=demo_worker("mistral", "mistral-7b"))
        assert response.status_code == 201, response.text
        spawned = time.monotonic()
        wait_for(driver, WORKER_KEYS, lambda keys: "e2e-dash/llm/mistral" in keys, timeout=5)
        appeared_s = time.monotonic() - spawned
        print(f"spawned worker shown after {appeared_s:.3f} s")
        assert appeared_s <= 1.0

        row = driver.execute_script(
            "return [...document.querySelector('.row[data-key=\"e2e-dash/llm/llama\"]').children]"
            ".map(c => c.textContent)")
        assert row[0] == "e2e-dash/llm/llama" and row[1] == "llama-3-8b"
        assert float(row[2]) >= 0 and float(row[3]) > 0  # CPU %, RSS MiB

        wait_for(driver, "return document.querySelector('.row[data-key=\"e2e-dash/llm/bge\"] .spark')"
                         ".textContent", bool, timeout=15)  # the sparkline, from /v1/history

        # sort by CPU (a button in the header), then filter by model: keyboard and mouse alike
        driver.execute_script("document.querySelector('[role=columnheader][data-key=\"cpu\"] button').click()")
        assert driver.execute_script(
            "return document.querySelector('[role=columnheader][data-key=\"cpu\"]').getAttribute('aria-sort')"
        ) == "descending"
        driver.execute_script("const s = document.getElementById('f-model'); s.value = 'qwen-7b';"
                              "s.dispatchEvent(new Event('change'))")
        wait_for(driver, WORKER_KEYS, lambda keys: keys == ["e2e-dash/llm/qwen"])
        driver.execute_script("const s = document.getElementById('f-model'); s.value = '';"
                              "s.dispatchEvent(new Event('change'))")
        wait_for(driver, WORKER_KEYS, lambda keys: len(keys) == 4)

        from selenium.webdriver.common.keys import Keys
        driver.execute_script("document.querySelector('.row[data-key=\"e2e-dash/llm/llama\"]').focus()")
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        wait_for(driver, "return document.querySelectorAll('#panel:not([hidden]) canvas').length",
                 lambda count: count >= 2)
        assert driver.execute_script("return document.getElementById('panel-title').textContent"
                                     ) == "e2e-dash/llm/llama"
        assert "endpoint http://127.0.0.1:18000/v1" in driver.execute_script(
            "return document.getElementById('panel-facts').textContent")
        screenshot(driver, tmp_path, "dashboard-panel.png")
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait_for(driver, "return document.getElementById('panel').hidden", bool)

        # a worker that dies stays listed, in its state (issue 22 item 4), until it is deleted
        bge = next(w for w in client.get(f"{h.url}/v1/workers").json() if w["instance"] == "bge")
        os.kill(bge["pid"], signal.SIGKILL)
        killed = time.monotonic()
        bge_cells = "return window.rbeeDashboard.cells('e2e-dash/llm/bge')"
        wait_for(driver, bge_cells, lambda cells: cells and cells[-1] == "exited", timeout=5)
        ended_s = time.monotonic() - killed
        print(f"killed worker shown as exited after {ended_s:.3f} s")
        assert ended_s <= 1.0
        assert driver.execute_script(
            "return document.querySelector('.row[data-key=\"e2e-dash/llm/bge\"] .state').className"
        ) == "state s-exited"
        assert client.delete(f"{h.url}/v1/workers/llm/bge").status_code == 200
        wait_for(driver, WORKER_KEYS, lambda keys: "e2e-dash/llm/bge" not in keys, timeout=5)
        assert sorted(driver.execute_script(WORKER_KEYS)) == keys_of("dash", "llama", "mistral", "qwen")

        screenshot(driver, tmp_path, "dashboard-light.png")
        driver.execute_script("document.getElementById('theme').click();"  # auto -> light -> dark
                              "document.getElementById('theme').click()")
        assert driver.execute_script("return document.documentElement.dataset.theme") == "dark"
        assert driver.execute_script(
            "return getComputedStyle(document.body).backgroundColor") == "rgb(18, 19, 20)"
        screenshot(driver, tmp_path, "dashboard-dark.png")
        assert console_errors(driver) == []


def test_dashboard_marks_stale_hives_and_drops_removed_ones(tmp_path):
    """A hive that falls silent is marked STALE (in words, not only in colour) once the queen
    says so, and its workers go with it when the queen removes it (1 s and 3 s here). Engine
    figures (queue, KV cache), when a worker carries them, fill their columns."""
    from .builders import heartbeat, worker

    with queen(tmp_path) as q, chromium(tmp_path) as driver, httpx.Client(timeout=10) as client:
        driver.get(f"{q.url}/")
        wait_for(driver, CONNECTION, lambda text: text == "live")
        body = encode(heartbeat("ghost", [worker("a"), worker("b")]))
        response = client.post(f"{q.url}/v1/hive-heartbeat", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        wait_for(driver, WORKER_KEYS, lambda keys: keys == ["ghost/llm/a", "ghost/llm/b"])
        cells = "return window.rbeeDashboard.cells('ghost/llm/a')"
        assert driver.execute_script(cells)[7:9] == [NOT_KNOWN, NOT_KNOWN]  # no engine figures
        wait_for(driver, cells, lambda shown: shown[0] == "ghost/llm/a · STALE", timeout=5)
        assert "STALE" in driver.execute_script("return document.getElementById('hives').textContent")
        assert driver.execute_script("return document.getElementById('s-hives').textContent"
                                     ) == "1 (1 stale)"
        wait_for(driver, WORKER_KEYS, lambda keys: keys == [], timeout=8)
        assert driver.execute_script("return document.getElementById('s-hives').textContent") == "0"

        event = msgspec.json.decode(encode(heartbeat("engines", [worker("vllm")])))
        driver.execute_script("""
            const beat = arguments[0];
            beat.workers[0].engine = {engine: "vllm", requests_running: 3, requests_waiting: 7,
                                      kv_cache_pct: 41.6};
            window.rbeeDashboard.apply({type: "hive_telemetry", hive_id: beat.hive.id,
                timestamp: beat.timestamp, workers: beat.workers, capabilities: []});""", event)
        shown = wait_for(driver, "return window.rbeeDashboard.cells('engines/llm/vllm')", bool)
        assert shown[7:9] == ["3 run / 7 wait", "42"]
        assert console_errors(driver) == []


def test_dashboard_shows_the_queens_idle_not_its_own(tmp_path):
    """The page's idle count and its "idle only" filter are the queen's judgement: a worker with
    8 requests running and 20 waiting is busy at 0 % GPU, one whose GPU figure is unknown is not
    idle, and the count is the one /v1/workers?idle=true gives (before, the page looked at GPU %
    only and said 2 where the queen said 1)."""
    from .builders import heartbeat, worker

    def beat(running: int, waiting: int) -> bytes:
        engine = EngineState(engine="vllm", requests_running=running, requests_waiting=waiting)
        return encode(heartbeat("idlers", [worker("quiet", gpu_util_pct=1.0),
                                           worker("queued", gpu_util_pct=0.0, engine=engine),
                                           worker("unknown", gpu_util_pct=None)]))

    idle_count = "return document.getElementById('s-idle').textContent"
    with queen(tmp_path, stale=60) as q, chromium(tmp_path) as driver, \
            httpx.Client(timeout=10) as client:
        driver.get(f"{q.url}/")
        wait_for(driver, CONNECTION, lambda text: text == "live")
        for running, waiting, expected in ((8, 20, ["idlers/llm/quiet"]),
                                           (0, 0, ["idlers/llm/queued", "idlers/llm/quiet"])):
            response = client.post(f"{q.url}/v1/hive-heartbeat", content=beat(running, waiting),
                                   headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text
            queen_idle = [f"{w['hive_id']}/{w['worker']['group']}/{w['worker']['instance']}"
                          for w in client.get(f"{q.url}/v1/workers", params={"idle": "true"}).json()]
            assert queen_idle == expected
            count = str(len(expected))
            wait_for(driver, idle_count, lambda text, count=count: text == count)
        driver.execute_script("const box = document.getElementById('f-idle'); box.checked = true;"
                              "box.dispatchEvent(new Event('change'))")
        wait_for(driver, WORKER_KEYS, lambda keys: sorted(keys) == expected)
        assert console_errors(driver) == []


def test_dashboard_opens_with_the_read_token(tmp_path):
    """With the queen's read_token_file set, the page opened as /?access_token=... follows the
    stream (the token as a query parameter) and reads the history (as a header): no 401."""
    from .builders import heartbeat, worker

    token = "dashboard-read-token-0123456789"
    (tmp_path / "read-token").write_text(token)
    with queen(tmp_path, read_token_file=str(tmp_path / "read-token")) as q, \
            chromium(tmp_path) as driver, httpx.Client(timeout=10) as client:
        assert client.get(f"{q.url}/v1/heartbeats/stream").status_code == 401
        driver.get(f"{q.url}/?access_token={token}")
        wait_for(driver, CONNECTION, lambda text: text == "live")
        response = client.post(f"{q.url}/v1/hive-heartbeat",
                               content=encode(heartbeat("guarded", [worker("a")])))
        assert response.status_code == 200, response.text
        wait_for(driver, WORKER_KEYS, lambda keys: keys == ["guarded/llm/a"])
        # the page asked for the history as it loaded: answered (a refusal would log a 401)
        wait_for(driver, HISTORY_STATUSES, lambda statuses: 200 in statuses)
        assert console_errors(driver) == []
        driver.get(f"{q.url}/")  # without the token: refused, and the console says so
        wait_for(driver, CONNECTION, lambda text: text != "live")
        wait_for(driver, HISTORY_STATUSES, lambda statuses: 401 in statuses)
        with_401: list[str] = []
        deadline = time.monotonic() + 10  # the console's entries may come after the response
        while not any("401" in message for message in with_401):
            assert time.monotonic() < deadline, with_401
            with_401 += console_errors(driver)
            time.sleep(0.05)


HISTORY_STATUSES = """return performance.getEntriesByType("resource")
    .filter((entry) => entry.name.includes("/v1/history")).map((entry) => entry.responseStatus)"""
"""The statuses of the page's history requests so far (the browser's resource timing)."""


def refused_while_down(message: str) -> bool:
    """What the browser logs while the queen stops and is away: its reads refused (503 while it
    shuts down, then no one listening)."""
    return (("/v1/heartbeats/stream" in message or "/v1/history" in message)
            and ("ERR_CONNECTION_REFUSED" in message or "status of 503" in message))


def test_dashboard_reconnects_after_queen_restart(tmp_path):
    """The queen stops (the page says it is reconnecting) and comes back on the same port with
    an empty registry; the hive fills it again and the page shows the whole fleet, live."""
    port = free_port()
    with queen(tmp_path, port=port) as q, hive(tmp_path, "back", q.url, [
            *FLEET[2:], demo_worker("other", "m")], collect={"gpu": "none", "interval_s": 0.25}), \
            chromium(tmp_path) as driver:
        driver.get(f"{q.url}/")
        expected = keys_of("back", "bge", "other")
        wait_for(driver, WORKER_KEYS, lambda keys: keys == expected)
        assert q.stop() == 0
        wait_for(driver, CONNECTION, lambda text: text.startswith("reconnecting"), timeout=5)
        assert driver.execute_script(WORKER_KEYS) == expected  # the last known fleet stays shown
        with queen(tmp_path, port=port):
            wait_for(driver, CONNECTION, lambda text: text == "live", timeout=10)
            wait_for(driver, WORKER_KEYS, lambda keys: keys == expected, timeout=5)
            assert driver.execute_script("return window.rbeeDashboard.stats.connects") >= 2
        # while the queen was down the browser logged its refused reconnections, nothing else
        assert console_errors(driver, allowed=refused_while_down) == []


def post_fleet(url: str, hives: int, per_hive: int, stop: threading.Event
               ) -> tuple[threading.Thread, list[BaseException]]:
    """Every second, a heartbeat of ``per_hive`` workers from each of ``hives`` hives, every
    figure changed (so every row has new numbers to show), from a thread until ``stop``.
    Returns the thread and the list its failures go to."""
    failures: list[BaseException] = []
    base = [fleet_heartbeat(f"load-{h:02d}", per_hive) for h in range(hives)]

    def run() -> None:
        with httpx.Client(timeout=5) as client:
            tick = 0
            while not stop.is_set():
                started = time.monotonic()
                for heartbeat in base:
                    workers = [msgspec.structs.replace(
                        w, cpu_pct=(tick * 7 + i) % 400 / 1.0, rss_mb=500.0 + (tick + i) % 97,
                        io_r_mb_s=(tick + i) % 13 / 4, uptime_s=60 + tick,
                        gpu_util_pct=float((tick * 3 + i) % 100))
                        for i, w in enumerate(heartbeat.workers)]
                    body = encode(msgspec.structs.replace(heartbeat, workers=workers))
                    try:
                        response = client.post(f"{url}/v1/hive-heartbeat", content=body,
                                               headers={"content-type": "application/json"})
                        assert response.status_code == 200, response.text
                    except BaseException as exc:
                        failures.append(exc)
                        return
                tick += 1
                stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failures


def measure_renders(tmp_path, hives: int, per_hive: int, seconds: float, sort: str = "name"
                    ) -> tuple[list[float], list[float]]:
    """``hives`` x ``per_hive`` workers, every figure changing every second, shown by a real
    browser for ``seconds`` sorted by the column ``sort``: the time of each render (script,
    style and layout) and of each event's handling (its JSON parsed and folded into the
    model), in ms."""
    stop = threading.Event()
    total = hives * per_hive
    with queen(tmp_path) as q, chromium(tmp_path) as driver:
        poster, failures = post_fleet(q.url, hives, per_hive, stop)
        try:
            driver.get(f"{q.url}/")
            wait_for(driver, WORKER_KEYS, lambda keys: keys is not None and len(keys) == total,
                     timeout=30)
            if sort != "name":
                driver.execute_script(f"document.querySelector('[data-key={sort}] button').click()")
            driver.execute_script("window.rbeeDashboard.stats.times.length = 0;"
                                  "window.rbeeDashboard.stats.applyTimes.length = 0")
            time.sleep(seconds)
            times = driver.execute_script("return window.rbeeDashboard.renderTimes()")
            applied = driver.execute_script("return window.rbeeDashboard.stats.applyTimes")
            assert len(driver.execute_script(WORKER_KEYS)) == total
            rows = driver.execute_script(
                "return document.querySelectorAll('#worker-rows .row').length")
            assert rows <= 100, rows  # only the rows in view (and a margin) are in the DOM
        finally:
            stop.set()
            poster.join(10)
        assert failures == []
        assert console_errors(driver) == []
    return times, applied


def summary_line(label: str, times: list[float], applied: list[float]) -> str:
    p95 = statistics.quantiles(times, n=20)[-1]
    return (f"{label}: {len(times)} renders, per update median {statistics.median(times):.2f} ms, "
            f"p95 {p95:.2f} ms, max {max(times):.2f} ms; {len(applied)} events, each "
            f"median {statistics.median(applied):.2f} ms, p95 "
            f"{statistics.quantiles(applied, n=20)[-1]:.2f} ms")


def test_dashboard_renders_1000_workers_within_a_frame(tmp_path):
    """10 hives x 100 workers, every figure changing every second: the median render (script,
    style and layout) takes at most a frame at 60 Hz (16 ms). bench/test_bench_dashboard.py
    measures 10,000."""
    times, applied = measure_renders(tmp_path, 10, 100, 10)
    assert len(times) >= 10, times  # about one render per heartbeat received
    print(summary_line("1000 workers", times, applied))
    median, p95 = statistics.median(times), statistics.quantiles(times, n=20)[-1]
    assert median <= 16.0, (median, p95)
    # The tail is the browser's style and layout preempted on a busy machine (2 shared cores
    # here: p95 50-80 ms while other suites ran), so it is bounded loosely; rebuilding every
    # row, as the first version did, showed as a median of 200 ms and a p95 of 600 ms.
    assert p95 <= 250.0, (median, p95)


def test_virtual_table_shows_the_rows_scrolled_to(tmp_path):
    """2,000 workers: only the rows in view (and a margin) are in the DOM, and scrolling shows
    exactly the workers at that place of the order, sorted by name and then by a figure."""
    with queen(tmp_path) as q, chromium(tmp_path, height=900) as driver:
        with httpx.Client(timeout=5) as client:
            for h in range(20):
                beat = fleet_heartbeat(f"big-{h:02d}", 100)
                beat.workers = [msgspec.structs.replace(w, cpu_pct=float((h * 100 + i) % 997))
                                for i, w in enumerate(beat.workers)]
                response = client.post(f"{q.url}/v1/hive-heartbeat", content=encode(beat))
                assert response.status_code == 200
        driver.get(f"{q.url}/")
        keys = wait_for(driver, WORKER_KEYS, lambda keys: keys is not None and len(keys) == 2000,
                        timeout=20)
        assert keys == sorted(keys)
        in_dom = "return [...document.querySelectorAll('#worker-rows .row')].map(r => r.dataset.key)"
        for row in (0, 777, 1990):
            driver.execute_script(f"document.getElementById('table-scroll').scrollTop = {row} * 28")
            shown = wait_for(driver, in_dom, lambda dom, row=row: row in range(
                len(keys)) and keys[row] in dom)
            start = keys.index(shown[0])
            assert shown == keys[start:start + len(shown)]  # a contiguous window of the order
            assert len(shown) <= 100 and start <= row < start + len(shown)
        driver.execute_script("document.querySelector('[data-key=cpu] button').click()")
        by_cpu = wait_for(driver, WORKER_KEYS, lambda order: order != keys)
        driver.execute_script("document.getElementById('table-scroll').scrollTop = 0")
        top = wait_for(driver, in_dom, lambda dom: dom and dom[0] == by_cpu[0])
        cpu_of_top = driver.execute_script(
            "return window.rbeeDashboard.cells(arguments[0])[2]", top[0])
        assert float(cpu_of_top) == 996.0  # the busiest worker first
        assert console_errors(driver) == []
