"""A queen's heartbeat writes to Redis, batched: every heartbeat that arrives while one batch is
on its way goes in the next, and a batch is one script call (``lua.HEARTBEATS``).

A call through the client costs the queen far more CPU than the bytes of one heartbeat: about
100 us of this process's CPU (the request crosses into glide's Rust core and its answer back to
trio), against about 9 us a heartbeat in a batch of 20 (``bench/test_bench_queens.py``). So a
batch leaves ``GATHER_S`` after its first heartbeat, or when the batch before it is answered if
that takes longer: the writes of many hives share one call. Each heartbeat is answered when its
batch is in Redis, as a single write would be, at most ``GATHER_S`` later.
"""

from __future__ import annotations

import trio

from ..._errors import StoreError
from .connection import RedisConnection
from .keys import text

GATHER_S = 0.005
"""How long a batch gathers heartbeats before it leaves: what it adds to a heartbeat's answer
(the fleet benchmark's bound on p99 is 50 ms)."""
WHOLE = "hb"
"""A whole heartbeat: the hive's record replaced."""
DELTA = "dl"
"""A channel's delta: a stream entry only."""


class _Batch:
    def __init__(self) -> None:
        self.args: list[str | bytes] = []
        self.done = trio.Event()
        self.ids: list[bytes | str | None] = []
        self.error: StoreError | None = None


class HeartbeatWrites:
    def __init__(self, redis: RedisConnection, maxlen: str) -> None:
        self.redis = redis
        self.maxlen = maxlen
        self._next = _Batch()
        self._wake = trio.Event()
        self.batches = 0
        """Batches written (a bench divides heartbeats by it)."""

    async def write(self, hive_id: str, kind: str, data: bytes) -> str | None:
        """Write one heartbeat (``WHOLE`` or ``DELTA``); its entry id, or None for a delta of a
        hive Redis holds no record of. Raises StoreError when its batch could not be written."""
        batch = self._next
        index = len(batch.args) // 3
        batch.args += (hive_id, kind, data)
        self._wake.set()
        await batch.done.wait()
        if batch.error is not None:
            raise StoreError(str(batch.error))
        entry_id = batch.ids[index]
        return None if entry_id is None else text(entry_id)

    async def run(self) -> None:
        """Write the batches, one at a time, until cancelled."""
        while True:
            await self._wake.wait()
            await trio.sleep(GATHER_S)
            self._wake = trio.Event()
            batch, self._next = self._next, _Batch()
            try:
                batch.ids = await self.redis.eval("HEARTBEATS", self.maxlen, *batch.args)
            except StoreError as exc:
                batch.error = exc
            self.batches += 1
            batch.done.set()
