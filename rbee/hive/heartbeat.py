"""The heartbeat sender: delivers the hive's latest snapshot to the queen, whatever the queen does.

It sends every snapshot the agent publishes: one per ``heartbeat.interval_s`` and one at once when
a worker spawns or exits. It holds only the latest snapshot, never a queue, so memory stays flat
however long the queen is away. Every request runs under the connect/read/write/pool timeouts of
the config. The first failure is logged, then a reminder every ``reminder_interval_s``, then the
recovery.

Two transports (``heartbeat.transport``). The channel (``rbee/hive/channel.py``, the default):
one WebSocket carrying a snapshot, then only what changed. A lost channel is reconnected after a
full-jitter wait (``reconnect_delay``; a busy queen's Retry-After first), so a restarted queen is
not stampeded by its whole fleet at once. POST: a whole heartbeat per request; a failed send
waits a capped exponential backoff with jitter, then sends whatever is latest by then (the
default cap equals the interval, so the queen hears from every hive within one interval of coming
back). With ``auto``, a queen that refuses the upgrade (an older one, or
``channel_enabled: false``) gets POSTs for ``channel_retry_s``, and then the channel is tried again.

With several queens (``queen_url`` a list, queens sharing one store), a failure (a send, or a lost
channel) moves to the next queen at once, without waiting: the backoff starts only when every
queen has failed in a row, so a hive whose queen died is heard by another within one interval (a
refused connection fails at once; a host that vanished costs ``connect_timeout_s``). The hive
stays with the queen that answers, and never moves back by itself, so a fleet does not flap.
"""

from __future__ import annotations

import gzip
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from .._errors import ConfigError
from ..config import HeartbeatSettings
from ..contract import HiveHeartbeat, encode, paths, reply_message
from ..http.auth import bearer, hive_basic
from ..http.tls import client_verify
from .channel import Channel, HeartbeatSource

log = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}
GZIP_JSON_HEADERS = {**JSON_HEADERS, "content-encoding": "gzip"}


def reconnect_delay(settings: HeartbeatSettings, rounds: int, retry_after_s: float | None,
                    fraction: float) -> float:
    """The wait before reconnecting after ``rounds`` failed rounds: full jitter (a uniform
    ``fraction`` of a window that doubles from ``reconnect_initial_s`` to ``reconnect_max_s``),
    after the queen's Retry-After if it gave one. Full jitter spreads a fleet whose queen
    restarted over the whole window, instead of all hives retrying at the same instants."""
    window = min(settings.reconnect_max_s, settings.reconnect_initial_s * 2.0 ** min(rounds, 32))
    return (retry_after_s or 0.0) + fraction * window


def parse_queen_url(url: str, source: str = "") -> httpx.URL:
    """The queen's base URL, or a ConfigError on ``queen_url`` saying what is wrong with it."""
    def problem(message: str) -> ConfigError:
        return ConfigError(message, source=source, key="queen_url")

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise problem(f"invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise problem(f"{url!r}: the scheme must be http or https")
    if not parsed.host or "%" in parsed.host:  # httpx percent-encodes a space in a host
        raise problem(f"{url!r}: no valid host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise problem(f"{url!r}: port {parsed.port} is out of range")
    return parsed


@dataclass
class DeliveryState:
    """How delivery is going, for logs, the hive's /health and tests."""

    delivered: int = 0
    failed_attempts: int = 0
    """Failed sends of the current outage (0 while the queen answers)."""
    failures_total: int = 0
    """Failed sends since the hive started: a lost heartbeat shows here even after recovery."""
    down_since: float | None = None
    """trio time of the first failure of the current outage; None while the queen answers."""
    last_problem: str = ""


class HeartbeatSender:
    def __init__(self, settings: HeartbeatSettings, queen_url: str | list[str],
                 source: HeartbeatSource, *, token: str | None = None,
                 credential: tuple[str, str] | None = None, ca_file: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 random_fraction: Callable[[], float] = random.random) -> None:
        self.settings = settings
        urls = [queen_url] if isinstance(queen_url, str) else queen_url
        self.queen_urls = [parse_queen_url(url) for url in urls]
        self._current = 0
        self.source = source
        self._headers = hive_basic(*credential) if credential is not None else bearer(token)
        """A hive's own credential (hive id, secret) is sent if it has one, else the token."""
        self._verify = client_verify(ca_file, "queen_ca_file")
        self.state = DeliveryState()
        self._transport = transport
        self._random = random_fraction
        self._reminded_at = 0.0
        self.channel: Channel | None = None
        """The channel in use or last used (``transport`` channel or auto), for tests and logs."""

    @property
    def on_channel(self) -> bool:
        """Whether heartbeats go over an open channel now (not POST)."""
        return self.channel is not None and self.channel.open

    @property
    def queen_url(self) -> httpx.URL:
        """The queen heartbeats go to now."""
        return self.queen_urls[self._current]

    def _client(self) -> httpx.AsyncClient:
        settings = self.settings
        timeout = httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                                write=settings.write_timeout_s, pool=settings.pool_timeout_s)
        return httpx.AsyncClient(timeout=timeout, headers=self._headers, verify=self._verify,
                                 transport=self._transport)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._client() as client:
            task_status.started()
            if self.settings.transport == "post":
                await self._post(client)
            while True:
                refusal = await self._channel(client)
                log.warning("queen %s: %s; heartbeats go by POST for %.0fs, then the channel is "
                            "tried again", self.queen_url, refusal, self.settings.channel_retry_s)
                with trio.move_on_after(self.settings.channel_retry_s):
                    await self._post(client)

    def _next_queen(self, failed_in_row: int) -> bool:
        """After a failure, move to the next queen; True if it is tried at once (the backoff is
        for a whole round of queens failing in a row)."""
        if len(self.queen_urls) < 2:
            return False
        self._current = (self._current + 1) % len(self.queen_urls)
        log.warning("moving heartbeats to queen %s", self.queen_url)
        return failed_in_row < len(self.queen_urls)

    async def _post(self, client: httpx.AsyncClient) -> None:
        """Whole heartbeats by POST, until cancelled (``transport: auto``) or forever."""
        settings = self.settings
        generation = 0
        backoff = settings.backoff_initial_s
        pending: HiveHeartbeat | None = None
        failed_in_row = 0
        while True:
            if pending is None:
                generation, pending = await self.source.wait_newer(generation)
            if await self.send(client, pending):
                pending, backoff, failed_in_row = None, settings.backoff_initial_s, 0
                continue
            failed_in_row += 1
            if self._next_queen(failed_in_row):
                continue
            failed_in_row = 0
            await trio.sleep(backoff * (0.5 + 0.5 * self._random()))
            backoff = min(backoff * 2, settings.backoff_max_s)
            generation, pending = self.source.generation, self.source.latest

    async def _channel(self, client: httpx.AsyncClient) -> str:
        """Heartbeats over a channel, reconnected (and failed over) whenever it ends, until a
        queen refuses the upgrade with ``transport: auto``: returns why."""
        settings = self.settings
        rounds = failed_in_row = 0
        while True:
            self.channel = Channel(settings, self.source, self)
            delivered = self.state.delivered
            ended = await self.channel.run(client, self.queen_url)
            if ended.refused and settings.transport == "auto":
                return ended.problem
            if self.state.delivered > delivered:  # it worked for a while: a fresh start
                rounds = failed_in_row = 0
            if not ended.reported:
                self.failed(ended.problem)
            failed_in_row += 1
            if self._next_queen(failed_in_row):
                continue
            failed_in_row = 0
            await trio.sleep(reconnect_delay(settings, rounds, ended.retry_after_s,
                                              self._random()))
            rounds += 1

    async def send_farewell(self, heartbeat: HiveHeartbeat) -> bool:
        """One attempt, on a fresh connection, to tell the queen this hive stopped."""
        async with self._client() as client:
            return await self.send(client, heartbeat)

    async def send(self, client: httpx.AsyncClient, heartbeat: HiveHeartbeat) -> bool:
        """One attempt; True if the queen accepted it. Never raises for the queen's faults."""
        body, headers = encode(heartbeat), JSON_HEADERS
        if self.settings.compress:
            body, headers = gzip.compress(body, compresslevel=1, mtime=0), GZIP_JSON_HEADERS
        try:
            url = self.queen_url
            response = await client.post(url.copy_with(path=url.path.rstrip("/") + paths.HEARTBEAT),
                                         content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return self.failed(f"timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            return self.failed(f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            detail = reply_message(response.content) or response.text[:200]
            return self.failed(f"HTTP {response.status_code}: {detail}".rstrip(": "))
        self.delivered()
        return True

    def failed(self, problem: str) -> bool:
        state, now = self.state, trio.current_time()
        state.failed_attempts += 1
        state.failures_total += 1
        state.last_problem = problem
        if state.down_since is None:
            state.down_since = self._reminded_at = now
            log.warning("queen %s: heartbeat not delivered: %s; the hive carries on and retries",
                        self.queen_url, problem)
        elif now - self._reminded_at >= self.settings.reminder_interval_s:
            self._reminded_at = now
            log.warning("queen %s still unreachable after %.0fs (%d attempts): %s",
                        self.queen_url, now - state.down_since, state.failed_attempts, problem)
        return False

    def delivered(self) -> None:
        state = self.state
        state.delivered += 1
        if state.down_since is not None:
            log.warning("queen %s reachable again after %.1fs", self.queen_url,
                        trio.current_time() - state.down_since)
            state.down_since = None
            state.failed_attempts = 0
