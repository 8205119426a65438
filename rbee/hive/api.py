"""The hive's HTTP API (default port 7835).

    GET    /health                       the hive's state and its link to the queen
    GET    /capabilities                 its GPUs, as the driver reports them
    GET    /v1/workers                   local telemetry, as in the latest heartbeat
    POST   /v1/workers                   spawn: a WorkerSpec (group, instance, argv, limits,
                                         env, restart policy); 201, or 4xx naming the problem
    DELETE /v1/workers/{group}/{instance}
    GET    /metrics                      its workers and GPUs, for Prometheus (rbee/scrape.py)

The paths are named in ``rbee/contract/paths.py``; errors answer by type (``STATUSES``).

With ``auth_token_file`` set, spawning and stopping take ``Authorization: Bearer <token>`` (401
without it); reads stay open. A worker spawned here is kept running by its restart policy, like
one from the config, until it is deleted.
"""

from __future__ import annotations

from typing import Protocol

import msgspec
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._errors import CgroupError, LimitError, NotFoundError, SpawnError, WorkerExistsError
from ..config import HiveConfig, WorkerSpec
from ..contract import HiveHealth, HiveHeartbeat, HiveRecord, decode_json, paths
from ..http.app import JsonResponse, Statuses, json_app, ok
from ..http.auth import require_token
from ..http.bodies import read_body
from ..scrape import metrics_route

STATUSES: Statuses = {
    NotFoundError: 404,
    WorkerExistsError: 409,
    LimitError: 400,
    SpawnError: 400,
    CgroupError: 503,
}
"""What the hive answers for each of its errors a handler lets through."""


class HiveContext(Protocol):
    """What the hive's API needs of the hive (``rbee/hive/service.py``)."""

    config: HiveConfig
    token: str | None

    @property
    def latest(self) -> HiveHeartbeat:
        """The heartbeat last built: the workers and GPUs as last collected."""

    def health(self) -> HiveHealth: ...

    async def spawn(self, spec: WorkerSpec) -> int:
        """Start a worker and keep it; its pid."""

    async def stop_worker(self, group: str, instance: str) -> None: ...


_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def _record(heartbeat: HiveHeartbeat) -> HiveRecord:
    return HiveRecord(info=heartbeat.hive, workers=heartbeat.workers, gpus=heartbeat.capabilities)


class HiveHandlers:
    """The hive's endpoints over its context."""

    def __init__(self, hive: HiveContext) -> None:
        self.hive = hive

    async def health(self, request: Request) -> Response:
        return JsonResponse(self.hive.health())

    async def capabilities(self, request: Request) -> Response:
        return JsonResponse(self.hive.latest.capabilities)

    async def list_workers(self, request: Request) -> Response:
        return JsonResponse(self.hive.latest.workers)

    async def spawn(self, request: Request) -> Response:
        hive = self.hive
        require_token(request, hive.token)
        body = await read_body(request, hive.config.http.max_body_bytes)
        spec = decode_json(_spec_decoder, body, "worker")  # a ContractError answers 400
        pid = await hive.spawn(spec)  # its errors answer by type (STATUSES)
        return ok(f"spawned {spec.group}/{spec.instance} (pid {pid})", status_code=201)

    async def stop(self, request: Request) -> Response:
        require_token(request, self.hive.token)
        group, instance = request.path_params["group"], request.path_params["instance"]
        await self.hive.stop_worker(group, instance)
        return ok(f"stopped {group}/{instance}")


def build_app(hive: HiveContext) -> Starlette:
    handlers = HiveHandlers(hive)
    metrics = CollectorRegistry(auto_describe=False)  # nothing of its own yet: the fleet alone
    return json_app([
        Route(paths.HEALTH, handlers.health, methods=["GET"]),
        Route(paths.CAPABILITIES, handlers.capabilities, methods=["GET"]),
        Route(paths.WORKERS, handlers.list_workers, methods=["GET"]),
        Route(paths.WORKERS, handlers.spawn, methods=["POST"]),
        Route(paths.HIVE_WORKER, handlers.stop, methods=["DELETE"]),
        metrics_route(metrics, lambda: [_record(hive.latest)]),
    ], hive.config.http, STATUSES)
