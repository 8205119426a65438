"""One queen's connections to Redis: connecting and calling with the store's timeouts, every
failure a StoreError naming the server, and the problems that make the store degraded."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import trio
from glide import (
    AdvancedGlideClientConfiguration,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    NodeAddress,
    Script,
)

from ..._errors import StoreError
from ...addresses import parse_redis_url
from ...config import StoreSettings
from . import lua
from .keys import RedisKeys

log = logging.getLogger(__name__)

SCRIPTS = ("HEARTBEATS", "RECORD", "REMOVE", "SILENCES", "SWEEP", "SNAPSHOT", "RENEW", "RELEASE")


class RedisClock:
    """Redis's clock, estimated from this host's monotonic one: the clock the registry of a
    shared fleet runs on (silences are judged on Redis's ``TIME``). Synced every lease tick."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()
        """Redis's clock less this host's monotonic one."""
        self._latest = 0.0

    def now(self) -> float:
        """Redis's clock (seconds), never less than it said before: a sync that finds this host
        ahead holds it until Redis's catches up, instead of stepping back (the registry's
        admission bucket would count a step back as tokens spent: at ``new_hives_per_s`` 1e6,
        a 40 ms step refused every new hive for 40 ms)."""
        now = time.monotonic() + self.offset
        if now < self._latest:
            return self._latest
        self._latest = now
        return now

    async def sync(self, redis: RedisConnection) -> None:
        before = time.monotonic()
        seconds, micros = await redis.command("TIME")
        after = time.monotonic()
        self.offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2


class RedisConnection:
    """Two clients: ``reader`` for the blocking ``XREAD``, ``client`` for everything else."""

    def __init__(self, settings: StoreSettings) -> None:
        assert settings.url is not None  # the config's own check
        self.settings = settings
        self.address = parse_redis_url(settings.url)
        self.keys = RedisKeys.under(settings.key_prefix)
        self.client: GlideClient | None = None
        self.reader: GlideClient | None = None
        self._scripts = {name: Script(getattr(lua, name)) for name in SCRIPTS}
        self._problems: dict[str, str] = {}

    async def open(self) -> None:
        self.client = await self._connect()
        self.reader = await self._connect()

    async def close(self) -> None:
        for client in (self.reader, self.client):
            if client is not None:
                with trio.move_on_after(self.settings.request_timeout_s):
                    await client.close()

    async def _connect(self) -> GlideClient:
        settings, address = self.settings, self.address
        config = GlideClientConfiguration(
            [NodeAddress(address.host, address.port)], use_tls=address.tls,
            database_id=address.db, request_timeout=int(settings.request_timeout_s * 1000),
            client_name="rbee-queen",
            advanced_config=AdvancedGlideClientConfiguration(
                connection_timeout=int(settings.connect_timeout_s * 1000)))
        try:
            with trio.fail_after(settings.connect_timeout_s + 1):
                return await GlideClient.create(config)
        except (GlideError, trio.TooSlowError) as exc:
            raise StoreError(f"cannot reach Redis at {settings.url} "
                             f"(registry.store.url): {describe(exc)}") from exc

    async def eval(self, name: str, *args: str | bytes):
        """Run one of the scripts (``lua.py``) over every key."""
        assert self.client is not None
        try:
            return await self.client.invoke_script(self._scripts[name], keys=list(self.keys),
                                                   args=list(args))
        except GlideError as exc:
            raise StoreError(f"Redis at {self.settings.url}: {describe(exc)}") from exc

    async def command(self, *args: str | bytes, reader: bool = False):
        """One command, on the reader's connection with ``reader``."""
        client = self.reader if reader else self.client
        assert client is not None
        try:
            return await client.custom_command(list(args))
        except GlideError as exc:
            raise StoreError(f"Redis at {self.settings.url}: {describe(exc)}") from exc

    # -- health ----------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why the store is degraded (each failing task's last error), or None."""
        return "; ".join(self._problems.values()) or None

    def ok(self, task: str) -> None:
        if self._problems.pop(task, None) is not None:
            log.warning("the registry store works again (%s)", task)

    def failed(self, task: str, exc: Exception) -> None:
        if task not in self._problems:
            log.warning("the registry store failed (%s): %s; serving what this queen holds",
                        task, exc)
        self._problems[task] = str(exc)


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def pairs(flat: Sequence) -> list[tuple]:
    return list(zip(flat[::2], flat[1::2], strict=True))
