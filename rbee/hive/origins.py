"""OriginPools: the transport of the hive's shared HTTP client, one small connection pool per origin.

A hive talks to one endpoint per worker (each engine's metrics port), 100 of them or more. In one
httpcore pool, assigning a request to a connection scans every connection of the pool, for every
queued request: with 100 origins in one pool a concurrent round costs O(n²) (measured here: 100
scrapes took ~700 ms of CPU, ~75 ms with a pool per origin). So each origin gets its own pool of at
most ``per_origin`` connections, kept alive across rounds; a pool unused for ``idle_close_s`` (its
worker gone) is closed, and all are closed with the client.
"""

from __future__ import annotations

import time

import httpx


class OriginPools(httpx.AsyncBaseTransport):
    def __init__(self, per_origin: int = 2, idle_close_s: float = 60.0) -> None:
        self.per_origin = per_origin
        self.idle_close_s = idle_close_s
        self._pools: dict[tuple[bytes, bytes, int | None], httpx.AsyncHTTPTransport] = {}
        self._used: dict[tuple[bytes, bytes, int | None], float] = {}
        self._swept = time.monotonic()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pools.get(origin)
        if pool is None:
            limits = httpx.Limits(max_connections=self.per_origin,
                                  max_keepalive_connections=self.per_origin)
            pool = self._pools[origin] = httpx.AsyncHTTPTransport(limits=limits)
        now = self._used[origin] = time.monotonic()
        if now - self._swept > self.idle_close_s:
            await self._close_idle(now)
        return await pool.handle_async_request(request)

    async def _close_idle(self, now: float) -> None:
        self._swept = now
        for origin in [o for o, used in self._used.items() if now - used > self.idle_close_s]:
            del self._used[origin]
            await self._pools.pop(origin).aclose()

    @property
    def origins(self) -> int:
        return len(self._pools)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        self._used.clear()
        for pool in pools:
            await pool.aclose()
