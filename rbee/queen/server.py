"""The queen process: HTTP server, registry, stream and background tasks in one trio nursery.

HTTP is hypercorn's trio worker serving the Starlette app. Three background tasks live beside it:
the stale cleanup (``registry.cleanup_interval_s``), the fleet summary on the stream
(``stream.queen_interval_s``) and the history's recording (``history.fine_step_s``). ``stop()``
first ends every SSE stream (sse-starlette's own shutdown
draining works only on asyncio, so under trio the streams would otherwise hold the server open),
then lets hypercorn finish requests in flight within ``http.shutdown_grace_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import trio

from .._http import serve
from .._transport import ConnectionTable
from ..auth import read_token
from ..config import QueenConfig
from ..credentials import HiveCredentials
from .api import build_app
from .broadcast import Broadcaster
from .history import FleetHistory
from .metrics import QueenMetrics
from .registry import HiveRegistry

log = logging.getLogger(__name__)


class QueenServer:
    def __init__(self, config: QueenConfig | None = None) -> None:
        self.config = config or QueenConfig()
        self.token = read_token(self.config.auth_token_file)
        self.read_token = read_token(self.config.read_token_file, key="read_token_file")
        self.credentials = (HiveCredentials(self.config.hive_credentials_file)
                            if self.config.hive_credentials_file else None)
        self.registry = HiveRegistry(self.config.registry)
        self.broadcaster = Broadcaster(client_buffer=self.config.stream.client_buffer,
                                       max_clients=self.config.stream.max_clients,
                                       snapshot=self.registry.snapshot,
                                       client_buffer_bytes=self.config.stream.client_buffer_bytes,
                                       write_chunk_bytes=self.config.stream.write_chunk_bytes)
        self.history = FleetHistory(self.config.history)
        self.connections = ConnectionTable(self.config.http.max_connections)
        self.metrics = QueenMetrics(self.registry.records,
                                    lambda: self.broadcaster.client_count,
                                    lambda: self.broadcaster.lagged_total, self.connections)
        self.app = build_app(self)
        self.urls: list[str] = []
        self._stopping = trio.Event()
        self.stopped = trio.Event()
        """Set when ``run`` has returned (or failed): nothing of the queen is running."""

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until ``stop()``; reports the bound URLs (``http://host:port``) when listening."""
        try:
            async with trio.open_nursery() as background:
                background.start_soon(self._cleanup_loop)
                background.start_soon(self._summary_loop)
                background.start_soon(self._history_loop)
                async with trio.open_nursery() as http:
                    self.urls = await http.start(self._serve_http)
                    log.info("queen listening on %s", ", ".join(self.urls))
                    task_status.started(self.urls)
                background.cancel_scope.cancel()
        finally:
            self.broadcaster.close()
            self.stopped.set()

    async def _serve_http(self, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(self.app, self.config.bind, self.config.port, self.config.http,
                    shutdown_trigger=self._shutdown, connections=self.connections,
                    task_status=task_status)

    def stop(self) -> None:
        """Begin a clean stop: streams end at once, requests in flight get the grace period."""
        self._stopping.set()

    async def _shutdown(self) -> None:
        await self._stopping.wait()
        self.broadcaster.close()

    async def _cleanup_loop(self) -> None:
        async for _ in every(self.config.registry.cleanup_interval_s):
            result = self.registry.sweep()
            for event in result.stale:
                log.warning("hive %r is stale: silent for %.1fs", event.hive_id, event.silent_s)
                self.broadcaster.publish(event)
            for event in result.removed:
                log.warning("hive %r removed with %d workers: %s", event.hive_id,
                            len(event.worker_ids), event.reason)
                self.broadcaster.publish(event)

    async def _history_loop(self) -> None:
        """One point of every figure each fine step, from the registry (so ingestion pays
        nothing for history); old series are dropped once a minute."""
        settings = self.config.history
        forgotten_at = trio.current_time()
        async for _ in every(settings.fine_step_s):
            self.history.record(self.registry.records(), time.time())
            if trio.current_time() - forgotten_at >= 60:
                forgotten_at = trio.current_time()
                self.history.forget_old(time.time())

    async def _summary_loop(self) -> None:
        async for _ in every(self.config.stream.queen_interval_s):
            self.broadcaster.publish(self.registry.summary())


async def every(interval: float) -> AsyncIterator[float]:
    """Yield at start + interval, start + 2 * interval, ... (no drift from the work between);
    ticks missed while the loop was busy are skipped, not bunched."""
    deadline = trio.current_time()
    while True:
        deadline += interval
        await trio.sleep_until(deadline)
        now = trio.current_time()
        if now - deadline > interval:
            deadline = now
        yield deadline
