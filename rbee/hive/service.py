"""The hive process as one trio task: agent, heartbeat sender and HTTP API in one nursery.

Construction checks what can be checked before anything starts (the token file, the queen URL,
the cgroup tree and its permissions), so a bad setup fails at once with an error naming the problem.
"""

from __future__ import annotations

import logging

import trio

from ..config import HiveConfig, WorkerSpec
from ..contract import HiveHealth, HiveHeartbeat, QueenLink
from ..credentials import read_secret
from ..http.auth import read_token
from ..http.serving import serve
from .agent import HiveAgent
from .api import build_app
from .heartbeat import HeartbeatSender

log = logging.getLogger(__name__)


class HiveService:
    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.token = read_token(config.auth_token_file)
        secret = read_secret(config.credential_file)
        self.agent = HiveAgent(config)
        self.sender = HeartbeatSender(config.heartbeat, config.queen_url, self.agent,
                                      token=self.token, ca_file=config.queen_ca_file,
                                      credential=None if secret is None else (config.id, secret))
        if self.agent.loops.engine_poll is not None:  # changes at once over the channel
            self.agent.loops.engine_poll.on_channel = lambda: self.sender.on_channel
        self.app = build_app(self)
        self.urls: list[str] = []
        self._stopping = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until ``stop()``; reports the API's bound URLs once workers and API are up."""
        try:
            await self._run(task_status)
        finally:
            if not self.agent.started:  # the API could not listen: no worker ever ran
                self.agent.monitor.backend.remove_root()

    async def _run(self, task_status: trio.TaskStatus[list[str]]) -> None:
        async with trio.open_nursery() as nursery:
            http_done = trio.Event()

            async def serve_api(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await serve(self.app, self.config.bind, self.config.port, self.config.http,
                                shutdown_trigger=self._stopping.wait, task_status=task_status)
                finally:
                    http_done.set()

            self.urls = await nursery.start(serve_api)
            self.agent.port = int(self.urls[0].rsplit(":", 1)[1])  # the real one, if port 0
            await nursery.start(self.agent.run)
            await nursery.start(self.sender.run)
            log.info("hive %s: API on %s, queen %s", self.config.id, " ".join(self.urls),
                     self.sender.queen_url)
            task_status.started(self.urls)
            await self._stopping.wait()
            with trio.move_on_after(self.config.http.shutdown_grace_s):
                await http_done.wait()  # requests in flight finish
            nursery.cancel_scope.cancel()  # the agent stops or releases its workers as it unwinds
        if self.config.stop_workers_on_exit:
            # Its workers are gone: the queen can drop this hive at once. Released workers run
            # on, so the queen keeps listing them until the next hive (a restart, a rolling
            # update) reports them again, or until they fall stale if none does.
            with trio.move_on_after(self.config.http.shutdown_grace_s):
                await self.sender.send_farewell(self.agent.farewell())

    def stop(self) -> None:
        self._stopping.set()

    # -- what the API asks of the hive (rbee/hive/api.py: HiveContext) --

    @property
    def latest(self) -> HiveHeartbeat:
        return self.agent.latest

    def health(self) -> HiveHealth:
        latest, state, sender = self.agent.latest, self.sender.state, self.sender
        return HiveHealth(
            status="ok", hive_id=self.config.id, operational_status=self.agent.status,
            health_status=latest.hive.health_status,
            cgroup_backend=self.agent.monitor.backend.name, workers=len(latest.workers),
            queen=QueenLink(url=str(sender.queen_url), reachable=state.down_since is None
                            and state.delivered > 0, delivered=state.delivered,
                            failed=state.failures_total, last_problem=state.last_problem))

    async def spawn(self, spec: WorkerSpec) -> int:
        return await self.agent.spawn(spec)

    async def stop_worker(self, group: str, instance: str) -> None:
        await self.agent.stop_worker(group, instance)
