"""The hive's HTTP API (default port 7835).

    GET    /health                       the hive's state and its link to the queen
    GET    /capabilities                 its GPUs, as the driver reports them
    GET    /v1/workers                   local telemetry, as in the latest heartbeat
    POST   /v1/workers                   spawn: a WorkerSpec (group, instance, argv, limits,
                                         env, restart policy); 201, or 4xx naming the problem
    DELETE /v1/workers/{group}/{instance}
    GET    /metrics                      its workers and GPUs, for Prometheus (rbee/exposition.py)

With ``auth_token_file`` set, spawning and stopping take ``Authorization: Bearer <token>`` (401
without it); reads stay open. A worker spawned here is kept running by its restart policy, like
one from the config, until it is deleted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .._errors import CgroupError, LimitError, NotFoundError, SpawnError
from .._http import ApiError, JsonResponse, json_app, ok, read_body
from ..auth import require_token
from ..config import WorkerSpec
from ..exposition import HiveRecord, metrics_route
from ..telemetry import HealthStatus, HiveHeartbeat, OperationalStatus, decode_json

if TYPE_CHECKING:
    from .service import HiveService


class QueenLink(msgspec.Struct, kw_only=True):
    url: str
    reachable: bool
    delivered: int
    failed: int
    """Sends that failed since the hive started (each one retried)."""
    last_problem: str


class HiveHealth(msgspec.Struct, kw_only=True):
    status: str
    hive_id: str
    operational_status: OperationalStatus
    health_status: HealthStatus
    cgroup_backend: str
    workers: int
    queen: QueenLink


_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def _record(heartbeat: HiveHeartbeat) -> HiveRecord:
    return HiveRecord(info=heartbeat.hive, workers=heartbeat.workers, gpus=heartbeat.capabilities)


def build_app(hive: HiveService) -> Starlette:
    agent, sender, config = hive.agent, hive.sender, hive.config
    metrics = CollectorRegistry(auto_describe=False)  # nothing of its own yet: the fleet alone

    async def health(request: Request) -> Response:
        latest = agent.latest
        state = sender.state
        return JsonResponse(HiveHealth(
            status="ok", hive_id=config.id, operational_status=agent.status,
            health_status=latest.hive.health_status, cgroup_backend=agent.monitor.backend.name,
            workers=len(latest.workers),
            queen=QueenLink(url=str(sender.queen_url), reachable=state.down_since is None
                            and state.delivered > 0, delivered=state.delivered,
                            failed=state.failures_total, last_problem=state.last_problem)))

    async def capabilities(request: Request) -> Response:
        return JsonResponse(agent.latest.capabilities)

    async def list_workers(request: Request) -> Response:
        return JsonResponse(agent.latest.workers)

    async def spawn(request: Request) -> Response:
        require_token(request, hive.token)
        body = await read_body(request, config.http.max_body_bytes)
        spec = decode_json(_spec_decoder, body, "worker")  # a ContractError answers 400
        try:
            pid = await agent.spawn(spec)
        except LimitError as exc:
            raise ApiError(400, str(exc)) from exc
        except SpawnError as exc:
            raise ApiError(409 if "already exists" in str(exc) else 400, str(exc)) from exc
        except CgroupError as exc:
            raise ApiError(503, str(exc)) from exc
        return ok(f"spawned {spec.group}/{spec.instance} (pid {pid})", status_code=201)

    async def stop(request: Request) -> Response:
        require_token(request, hive.token)
        group, instance = request.path_params["group"], request.path_params["instance"]
        try:
            await agent.stop_worker(group, instance)
        except NotFoundError as exc:
            raise ApiError(404, str(exc)) from exc
        return ok(f"stopped {group}/{instance}")

    return json_app([
        Route("/health", health, methods=["GET"]),
        Route("/capabilities", capabilities, methods=["GET"]),
        Route("/v1/workers", list_workers, methods=["GET"]),
        Route("/v1/workers", spawn, methods=["POST"]),
        Route("/v1/workers/{group}/{instance}", stop, methods=["DELETE"]),
        metrics_route(metrics, lambda: [_record(agent.latest)]),
    ], config.http)
