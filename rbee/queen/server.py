"""The queen process: HTTP server, fleet, stream and background tasks in one trio nursery.

HTTP is hypercorn's trio worker serving the Starlette app. Beside it run the background tasks of
the fleet's store (``rbee/queen/fleet.py``: the stale cleanup every ``registry.cleanup_interval_s``,
the fleet summary on the stream every ``stream.queen_interval_s``; with redis also the stream's
follower and the sweeper's lease), the history's recording (``history.fine_step_s``) and the
pacing of garbage collection (``rbee/queen/gcpace.py``). The store
is started first: a queen whose Redis cannot be reached at start says so and exits. ``stop()``
first ends every SSE stream (sse-starlette's own shutdown draining works only on asyncio, so under
trio the streams would otherwise hold the server open), then lets hypercorn finish requests in
flight within ``http.shutdown_grace_s``.
"""

from __future__ import annotations

import logging
import time

import trio

from ..config import QueenConfig
from ..credentials import HiveCredentials
from ..http.auth import read_token
from ..http.serving import serve
from ..http.transport import ConnectionTable
from .api import build_app
from .channel import OpenChannels
from .channelhub import ChannelHub
from .fleet import open_fleet
from .gcpace import GcGauges, GcPacer
from .history import FleetHistory
from .history.gauges import HistoryGauges
from .metrics import QueenMetrics
from .ticks import every

log = logging.getLogger(__name__)


class QueenServer:
    def __init__(self, config: QueenConfig | None = None) -> None:
        self.config = config or QueenConfig()
        self.token = read_token(self.config.auth_token_file)
        self.read_token = read_token(self.config.read_token_file, key="read_token_file")
        self.credentials = (HiveCredentials(self.config.hive_credentials_file)
                            if self.config.hive_credentials_file else None)
        self.fleet = open_fleet(self.config)
        self.registry = self.fleet.registry
        self.broadcaster = self.fleet.broadcaster
        self.history = FleetHistory(self.config.history)
        self.registry.observe(self.history.hive_changed)  # each heartbeat noted for the next step
        self.connections = ConnectionTable(self.config.http.max_connections)
        self.metrics = QueenMetrics(self.registry,
                                    lambda: self.broadcaster.client_count,
                                    lambda: self.broadcaster.lagged_total, self.connections,
                                    self.config.metrics.max_workers)
        self.metrics.registry.register(HistoryGauges(self.history))
        self.channels = OpenChannels(self.config.http.shutdown_grace_s,
                                     self.config.http.keep_alive_timeout_s)
        self.gc = GcPacer(self.config.gc)
        self.metrics.registry.register(GcGauges(self.gc))
        self.hub = ChannelHub()
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
                await background.start(self.fleet.store.run)
                background.start_soon(self._history_loop)
                background.start_soon(self.gc.run)
                background.start_soon(self.channels.reap)
                background.start_soon(self.hub.run)
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
        self.channels.close()

    async def _history_loop(self) -> None:
        """Each fine step, one point of every figure of the hives that reported since the last
        (the registry notes them to the history as it takes them: ingestion pays a dict write),
        in parts with a checkpoint between them, never one long stall of the event loop; a hive
        seen for the first time is recorded within a second. Series not reported for the coarse
        retention are dropped once a minute."""
        settings = self.config.history
        forgotten_at = trio.current_time()
        async for _ in every(min(1.0, settings.fine_step_s)):
            for _part in self.history.recording(time.time()):
                await trio.lowlevel.checkpoint()
            if trio.current_time() - forgotten_at >= 60:
                forgotten_at = trio.current_time()
                self.history.forget_old(time.time())
