"""``GET /v1/pick``: the query, decoded and checked, handed to the index; refusals named.

    GET /v1/pick?model=M&n=K   the K best workers of model M (``PickAnswer``), best first, with
                               the filters of /v1/workers (idle, min_free_vram_mb, max_waiting,
                               max_kv_cache_pct). 400 for a bad query, 503 naming why no worker
                               can be offered.

The route is answered by the connection itself (``rbee/http/rawpost.py``, ``app.state.raw_gets``)
when the request allows, else by the Starlette app; both end in ``PickHandler.answer_to``, so
the answers and refusals are the same. The index places the hives changed since the last pick
first, in parts (``PickIndex.refresh``), so a pick never holds the event loop for the fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ...config import QueenConfig
from ...contract import encode
from ...http.app import JsonResponse
from ...http.errors import ApiError
from ...http.rawpost import RawHead
from ..queries import decode_query, whole
from ..registry import HiveRegistry
from ..scheduling import WorkerQuery
from .index import PickIndex, PickUnavailable


class PickQuery(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /v1/pick``: the model and how many, then the filters of ``/v1/workers``."""

    model: str | None = None
    n: float | None = None
    """A whole number from 1 to ``pick.max_n`` (default 1)."""
    idle: bool = False
    min_free_vram_mb: float | None = None
    max_waiting: float | None = None
    max_kv_cache_pct: float | None = None


class PickHandler:
    def __init__(self, config: QueenConfig, index: PickIndex,
                 reader: Callable[[Request], None]) -> None:
        self.max_n, self.index, self.reader = config.pick.max_n, index, reader

    async def pick(self, request: Request) -> Response:
        """The route through the Starlette app."""
        self.reader(request)
        return Response(await self.answer_to(request.query_params),
                        media_type=JsonResponse.media_type)

    def admit(self, head: RawHead) -> None:
        """The caller of a raw GET (``rbee/http/rawpost.py``): a refusal goes to the app."""
        self.reader(head)  # type: ignore[arg-type]

    async def answer(self, head: RawHead, admitted: None, body: bytes) -> bytes:
        """A raw GET's 200 JSON (or what its ``ApiError`` answers)."""
        return await self.answer_to(dict(parse_qsl(head.query, keep_blank_values=True)))

    async def answer_to(self, query_params: Mapping[str, str]) -> bytes:
        """The pick the query asks for, as JSON; ``ApiError`` naming a refusal."""
        params = decode_query(query_params, PickQuery)
        if not params.model:
            raise ApiError(400, "query parameter 'model' is required: the model to pick a "
                                "worker for")
        n = whole("n", params.n, query_params.get("n"))
        if n is not None and not 1 <= n <= self.max_n:
            raise ApiError(400, f"query parameter 'n' must be from 1 to {self.max_n} "
                                f"(pick.max_n), not {n}")
        query = WorkerQuery(idle=params.idle, model=params.model,
                            min_free_vram_mb=params.min_free_vram_mb,
                            max_kv_cache_pct=params.max_kv_cache_pct,
                            max_waiting=whole("max_waiting", params.max_waiting,
                                              query_params.get("max_waiting")))
        await self.index.refresh(vram=query.min_free_vram_mb is not None)
        try:
            return encode(self.index.pick(query, n or 1))
        except PickUnavailable as exc:
            raise ApiError(503, str(exc)) from exc


def pick_handler(config: QueenConfig, registry: HiveRegistry,
                 reader: Callable[[Request], None]) -> PickHandler:
    """The pick's handler (``.pick``), over an index that follows ``registry`` from now on."""
    index = PickIndex(config.pick, config.registry, clock=registry.clock)
    registry.observe(index.hive_changed)
    return PickHandler(config, index, reader)
