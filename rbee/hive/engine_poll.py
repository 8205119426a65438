"""The fast engine poll: each local engine's scheduling figures every ``poll_interval_s``, and
each change published to the queen at once.

A router that polls ``/metrics`` itself (llm-d's endpoint picker, every 50 ms) pays a full
exposition render and parse per engine per poll; the hive sits beside its engines, so it asks the
cheapest thing each engine offers (``rbee.collectors.engine.loads``) on one kept-alive connection
per engine (``EngineLink``), and sends only what changed.

Each engine has a task of its own, so a slow or dead engine delays no other: it polls, merges the
reading into its worker's last full state (rates and percentiles stay the heartbeat's), and when
a scheduling figure moved (running, waiting, KV cache %, or the engine became unreadable or
readable again) it hands the new state to the publisher. The tasks poll in rounds: every engine
at the same multiple of ``poll_interval_s`` on the hive's clock. So the changes of a round arrive
together, and the publisher coalesces them without a wait of its own: it publishes once the
round's polls have all answered (or ``SETTLE_SHARE`` of a round after the first change, however
slow one engine is). A change waits at most a round for its poll and a few milliseconds for its
round, never a further coalescing window; however many engines changed in a round, the hive
publishes one new snapshot. Over POST the publications are further held to one per
``post_min_interval_s`` (each POST is a whole heartbeat). Every state carries ``sampled_at``,
the wall time of its reading, so a reader knows its age.

A worker's polling begins after its first full ``/metrics`` reading has named its engine; it
ends when the worker goes. The full reading (every ``interval_s``) also keeps the heartbeat's
state: the fast poll writes each of its readings back into the worker's engine slot, so the next
heartbeat never shows a figure older than the last poll.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import trio

from ..collectors.engine import NAME as ENGINE_SLOT
from ..collectors.engine.engines import EngineError
from ..collectors.engine.launchers import metrics_url_from_argv
from ..collectors.engine.link import EngineLink, EngineStatusError
from ..collectors.engine.loads import FastPath, fast_path, metrics_path_for
from ..config import EngineSettings
from ..contract import EngineState, utc_now
from ..plugin import WorkerView

log = logging.getLogger(__name__)

WorkerKey = tuple[str, str]
Change = EngineState | str
"""A worker's new engine state, or why its engine cannot be read now."""
NO_LOAD_ENDPOINT = (404, 405, 501)
"""Statuses that mean "no such endpoint here" (an older engine, the feature off)."""
SETTLE_SHARE = 0.25
"""How long, as a share of ``poll_interval_s``, the publisher waits for the rest of a round's
polls after a change: a round's answers come within milliseconds of each other, and an engine
slower than this is published with a round of its own."""
COLLECTOR = "engine.scraper"
"""Whose entry in a worker's ``errors`` an unreadable engine is: the engine collector's."""


def next_round(now: float, interval_s: float) -> float:
    """The start of the first round after ``now``: rounds are the multiples of the interval,
    so every engine of the hive is polled at the same instants. A poll that began at a round's
    start (``now / interval_s`` a whole number, give or take a rounding error) waits for the
    next one."""
    return (math.floor(now / interval_s + 1e-6) + 1) * interval_s


def scheduling(change: Change | None) -> tuple | str | None:
    """What a router schedules by: a change of anything else is not pushed."""
    if isinstance(change, EngineState):
        return change.requests_running, change.requests_waiting, change.kv_cache_pct
    return change


class EnginePoller:
    """Polls every engine of ``views()`` and publishes what changed through ``publish``."""

    def __init__(self, views: Callable[[], list[WorkerView]], settings: EngineSettings,
                 publish: Callable[[Mapping[WorkerKey, Change]], object],
                 on_channel: Callable[[], bool] = lambda: False) -> None:
        self.views = views
        self.settings = settings
        self.publish = publish
        self.on_channel = on_channel
        """Whether the sender delivers over the channel now (the hive's service says): then
        changes go every round and unchanged figures are re-sent after ``resend_after_s``; over
        POST, at most every ``post_min_interval_s`` and the heartbeat re-sends them."""
        self.polls = 0
        self.publications = 0
        self._pending: dict[WorkerKey, Change] = {}
        self._pending_change = False
        """Whether ``_pending`` holds a change, not only re-sent states."""
        self._wake = trio.Event()
        self._in_flight = 0
        """Polls sent and not yet answered (and handed over): the publisher waits for them."""
        self._answered = trio.Event()
        """Set when ``_in_flight`` falls to 0."""
        self._tasks: dict[WorkerView, trio.CancelScope] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher)
            while True:
                self._follow_workers(nursery)
                await trio.sleep(self.settings.poll_interval_s * 4)

    def _follow_workers(self, nursery: trio.Nursery) -> None:
        """A poll task for each worker whose engine is known; a gone worker's task ends."""
        views = {view: None for view in self.views()}
        for view, scope in list(self._tasks.items()):
            if view not in views:
                scope.cancel()
                del self._tasks[view]
        for view in views:
            if view not in self._tasks and view.state(ENGINE_SLOT).get("engine") is not None:
                url = view.metrics_url or metrics_url_from_argv(view.argv)
                if url is not None:
                    self._tasks[view] = scope = trio.CancelScope()
                    nursery.start_soon(self._poll_worker, view, url, scope)

    async def _poll_worker(self, view: WorkerView, metrics_url: str,
                           scope: trio.CancelScope) -> None:
        settings = self.settings
        slot = view.state(ENGINE_SLOT)
        metrics_path = urlsplit(metrics_url).path or "/metrics"
        engine = slot["engine"]
        path = fast_path(engine, metrics_path, view.argv)
        cache: dict = {}
        try:
            link = EngineLink(metrics_url, settings.timeout_s, settings.max_bytes)
        except EngineError as exc:
            log.warning("worker %s/%s: no fast engine poll: %s", view.group, view.instance, exc)
            return
        key = (view.group, view.instance)
        with scope:
            try:
                while True:
                    started = trio.current_time()
                    if slot.get("engine", engine) != engine:  # another engine on the port
                        engine, cache = slot["engine"], {}
                        path = fast_path(engine, metrics_path, view.argv)
                    self._poll_sent()
                    try:
                        change, path = await self._poll_once(link, path, slot, cache,
                                                             metrics_path)
                        if change is None:
                            pass
                        elif scheduling(change) != scheduling(slot.get("poll_sent")):
                            self._hand_over(slot, key, change, started, changed=True)
                        elif self._due_again(slot, started):
                            self._hand_over(slot, key, change, started, changed=False)
                    finally:
                        self._poll_answered()
                    await trio.sleep_until(next_round(trio.current_time(),
                                                      settings.poll_interval_s))
            finally:
                await link.aclose()

    async def _poll_once(self, link: EngineLink, path: FastPath, slot: dict, cache: dict,
                         metrics_path: str) -> tuple[Change | None, FastPath]:
        """One poll: the worker's new state, or why its engine is unreadable (also written to
        the worker's engine slot, so the next heartbeat says the same); None while the worker
        has no full state to merge into. Also the fast path to use next time."""
        self.polls += 1
        found = slot.get("result")
        if found is not None and found is not slot.get("poll_wrote"):
            # a full reading came since: merge into it; after its error (counters went
            # backwards, malformed), wait for its next good one
            slot["poll_base"] = found[1] if isinstance(found[1], EngineState) else None
        base = slot.get("poll_base")
        try:
            reading = path.read(await link.get(path.path), cache)
            if base is None or slot.get("result") is not found:
                return None, path  # nothing to merge into, or a full reading came meanwhile
            new = reading.apply(base)
        except EngineStatusError as exc:
            if path.load_endpoint and exc.status in NO_LOAD_ENDPOINT:
                log.info("%s%s answers %d: polling its /metrics instead", link.origin,
                         path.path, exc.status)
                return None, metrics_path_for(slot["engine"], metrics_path)
            return self._unreadable(slot, str(exc)), path
        except EngineError as exc:
            return self._unreadable(slot, str(exc)), path
        new.sampled_at = utc_now()
        slot["result"] = slot["poll_wrote"] = (time.monotonic(), new)
        return new, path

    def _poll_sent(self) -> None:
        self._in_flight += 1

    def _poll_answered(self) -> None:
        """A poll is over (its change, if any, handed over): the last of a round wakes the
        publisher's wait."""
        self._in_flight -= 1
        if not self._in_flight:
            self._answered.set()

    def _hand_over(self, slot: dict, key: WorkerKey, change: Change, now: float,
                   changed: bool) -> None:
        """To the publisher: a change, or an unchanged state re-sent (``changed`` False)."""
        slot["poll_sent"], slot["poll_sent_at"] = change, now
        self._pending[key] = change
        self._pending_change = self._pending_change or changed
        self._wake.set()

    def _due_again(self, slot: dict, now: float) -> bool:
        """An unchanged state is sent again once the queen's copy is ``resend_after_s`` old
        (over the channel only), so its ``sampled_at`` says the figures are fresh."""
        resend = self.settings.resend_after_s
        return (resend > 0 and now - slot.get("poll_sent_at", now) >= resend
                and self.on_channel())

    @staticmethod
    def _unreadable(slot: dict, problem: str) -> str:
        slot["result"] = slot["poll_wrote"] = (time.monotonic(), problem)
        return problem

    async def _publisher(self) -> None:
        """Publish what is pending once the round's polls have answered (at most
        ``SETTLE_SHARE`` of a round after the first change). Over POST, after a change, wait
        ``post_min_interval_s`` before the next publication; a publication of re-sent states
        alone starts no wait, so it never holds back the change that follows it."""
        settings = self.settings
        while True:
            await self._wake.wait()
            with trio.move_on_after(settings.poll_interval_s * SETTLE_SHARE):
                while self._in_flight:
                    self._answered = trio.Event()
                    await self._answered.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, {}
            changed, self._pending_change = self._pending_change, False
            if pending:
                self.publish(pending)
                self.publications += 1
            if changed and not self.on_channel():
                await trio.sleep(max(settings.poll_interval_s, settings.post_min_interval_s))
