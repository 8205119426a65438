"""Each worker's own inference-engine state (vLLM, SGLang, TGI, llama.cpp) from its metrics port.

Where: the worker spec's ``metrics_url``, else the port its launcher's argv names
(``rbee.collectors.engine.launchers``). When: ``rbee_refresh_workers``, the hive's async refresh, every
``collect.interval_s`` apart from the collection tick: every worker is fetched concurrently (at most
``collect.engine.max_concurrency`` at once), each under ``collect.engine.timeout_s`` for the whole
exchange and refused past ``collect.engine.max_bytes``; then all the bodies are parsed in one
worker thread, off the event loop. A plain ``http://`` endpoint is read over a kept-alive
``EngineLink`` of its own (identity encoding: a few hundred lines of text on the loopback are not
worth a gzip), as the fast poll reads it: through the hive's pooled httpx client a GET cost about
1 ms of the event loop, and the hive's 100 engines' reads came in one burst each second that held
every engine's fast poll back. Other endpoints (``https://``) go through that httpx client. The
per-worker hook only reads what the last refresh stored, so a slow or dead engine never delays a
tick.

This is the full reading, at the heartbeat's rate; the scheduling figures (running, waiting, KV
cache) are also polled every ``collect.engine.poll_interval_s`` by the hive's fast poll
(``rbee.hive.engine_poll``, from ``loads``' cheap endpoints over ``link``'s kept-alive
connections), which merges its readings into the state stored here. Every state carries
``sampled_at``, the wall time of its reading.

A worker whose endpoint is unreachable, answers non-200, sends garbage, too much, too slowly, or
whose counters went backwards gets ``engine: null`` and one ``errors`` entry saying which; nothing
else in its record changes. A result older than three intervals (the refresh itself stuck) is not
shown either.
"""

from __future__ import annotations

import json
import time

import httpx
import trio

from rbee.contract import utc_now
from rbee.plugin import hookimpl

from .engines import ENGINE_NAMES, EngineError, EngineTracker, parse_exposition
from .launchers import metrics_url_from_argv
from .link import EngineLink

NAME = "engine"
STALE_INTERVALS = 3
VERSION_RETRY_S = 300.0
VERSION_MAX_BYTES = 2**20


async def fetch(http: httpx.AsyncClient, url: str, timeout_s: float, max_bytes: int) -> bytes:
    """The body of ``GET url``: EngineError for a non-200 answer or a body over ``max_bytes``
    (counted as sent and again once decompressed, so no gzip bomb gets past it),
    trio.TooSlowError past ``timeout_s`` for the whole exchange."""
    with trio.fail_after(timeout_s):
        async with http.stream("GET", url, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise EngineError(f"HTTP {response.status_code} from {url}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise EngineError(f"{url} sent {declared} bytes, over collect.engine.max_bytes "
                                  f"({max_bytes})")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():  # decoded: engines gzip when asked
                size += len(chunk)
                if size > max_bytes:
                    raise EngineError(f"{url} sent more than {max_bytes} bytes, over "
                                      f"collect.engine.max_bytes ({max_bytes})")
                chunks.append(chunk)
    return b"".join(chunks)


async def fetch_version(http: httpx.AsyncClient, link: EngineLink | None, metrics_url: str,
                        engine: str, timeout_s: float) -> str | None:
    """The engine's version from its info endpoint on the metrics port (over ``link`` when the
    engine has one); None when it has none or says nothing readable (an engine's version is
    nice to have, never an error)."""
    names = ENGINE_NAMES[engine]
    if names.version_path is None:
        return None
    try:
        if link is not None:
            body = await link.get(names.version_path)
        else:
            url = str(httpx.URL(metrics_url).copy_with(path=names.version_path, query=None))
            body = await fetch(http, url, timeout_s, VERSION_MAX_BYTES)
        info = json.loads(body)
    except (EngineError, httpx.HTTPError, trio.TooSlowError, ValueError):
        return None
    version = info.get(names.version_key) if isinstance(info, dict) else None
    return version[:64] if isinstance(version, str) and version else None


class EngineCollector:
    """Per-hive state: settings, and the scrape. Per-worker state lives in each worker's
    ``state("engine")`` slot: its tracker (readings over time), its last result, and its
    engine's version (asked once the engine is known; again after ``VERSION_RETRY_S`` if the
    engine did not say)."""

    def __init__(self, settings, interval_s: float) -> None:
        self.settings = settings
        self.stale_after_s = STALE_INTERVALS * interval_s
        self._links: dict[object, tuple[str, EngineLink | None, str]] = {}
        """Per worker view: its metrics URL, the link that reads it (None: not plain http) and
        the path (with its query) the link asks for."""

    async def _get(self, worker, url: str, http: httpx.AsyncClient) -> bytes:
        """The body of the worker's ``GET url``, over its own kept-alive link if it has one."""
        known = self._links.get(worker)
        if known is None or known[0] != url:
            if known is not None and known[1] is not None:
                known[1].close()
            try:
                link = EngineLink(url, self.settings.timeout_s, self.settings.max_bytes)
            except EngineError:
                link = None
            path = httpx.URL(url).raw_path.decode("ascii")
            known = self._links[worker] = (url, link, path)
        _, link, path = known
        if link is None:
            return await fetch(http, url, self.settings.timeout_s, self.settings.max_bytes)
        return await link.get(path)

    def _forget_gone(self, workers) -> None:
        """Close the links of workers no longer there."""
        here = set(workers)
        for worker in [w for w in self._links if w not in here]:
            link = self._links.pop(worker)[1]
            if link is not None:
                link.close()

    @hookimpl
    def rbee_collector_teardown(self) -> None:
        self._forget_gone(())

    @hookimpl
    async def rbee_refresh_workers(self, workers, http) -> None:
        limiter = trio.CapacityLimiter(self.settings.max_concurrency)
        fetched: list[tuple[object, bytes | Exception, float, object]] = []

        async def scrape(worker, url: str) -> None:
            async with limiter:
                try:
                    body: bytes | Exception = await self._get(worker, url, http)
                except trio.TooSlowError:
                    body = EngineError(f"no answer from {url} within "
                                       f"{self.settings.timeout_s:g}s")
                except httpx.HTTPError as exc:
                    body = EngineError(f"cannot read {url}: {type(exc).__name__}: {exc}")
                except EngineError as exc:
                    body = exc
                taken_at, sampled_at = time.monotonic(), utc_now()
                slot = worker.state(NAME)
                engine = slot.get("engine")
                if (engine is not None and slot.get("version") is None
                        and taken_at - slot.get("version_asked_at", -VERSION_RETRY_S)
                        >= VERSION_RETRY_S):
                    slot["version_asked_at"] = taken_at
                    slot["version"] = await fetch_version(http, self._links[worker][1], url,
                                                          engine, self.settings.timeout_s)
            fetched.append((worker, body, taken_at, sampled_at))

        self._forget_gone(workers)
        async with trio.open_nursery() as nursery:
            for worker in workers:
                url = worker.metrics_url or metrics_url_from_argv(worker.argv)
                if url is not None:
                    nursery.start_soon(scrape, worker, url)
                else:
                    worker.state(NAME).pop("result", None)
        if fetched:
            await trio.to_thread.run_sync(self._parse_all, fetched)

    def _parse_all(self, fetched) -> None:
        """In a worker thread: each body into its worker's tracker, the outcome into its slot."""
        for worker, body, taken_at, sampled_at in fetched:
            slot = worker.state(NAME)
            tracker = slot.get("tracker")
            if tracker is None:
                tracker = slot["tracker"] = EngineTracker(self.settings.ttft_window_s)
            try:
                if isinstance(body, Exception):
                    raise body
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise EngineError(f"metrics are not UTF-8 text: {exc}") from exc
                reading = parse_exposition(text, taken_at, slot.setdefault("lines", {}))
                state = tracker.update(reading)
                if slot.get("engine") != reading.engine:  # a new engine on the port: ask again
                    slot["engine"], slot["version"] = reading.engine, None
                    slot.pop("version_asked_at", None)
                state.version = slot.get("version")
                state.sampled_at = sampled_at
                slot["result"] = (taken_at, state)
            except EngineError as exc:
                slot["result"] = (taken_at, str(exc))

    @hookimpl
    def rbee_collect_worker(self, worker, telemetry) -> None:
        found = worker.state(NAME).get("result")
        if found is None:
            return
        taken_at, result = found
        age = time.monotonic() - taken_at
        if age > self.stale_after_s:
            raise EngineError(f"engine metrics are {age:.1f}s old (refresh stalled)")
        if isinstance(result, str):
            raise EngineError(result)
        telemetry.engine = result


@hookimpl
def rbee_collector_setup(settings, plugin_manager) -> None:
    plugin_manager.register(EngineCollector(settings.engine, settings.interval_s),
                            name="engine.scraper")
