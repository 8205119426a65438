"""``GET /metrics`` of the queen and of a hive: the format the scraper asks for (OpenMetrics or
text 0.0.4), the samples it names (``name[]``), and the exposition (``rbee.exposition``) written
on the event loop in parts, sent as they are written."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Iterator

import trio
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .contract import HiveRecord, paths
from .exposition import FLEET_PREFIXES, fleet_parts

Detail = Callable[[list[HiveRecord]], bool]
"""Whether a scrape lists each worker and GPU of these hives (else the hives' families only)."""


def exposition(registry: CollectorRegistry, accept: str | None,
               hives: Callable[[], list[HiveRecord]] | None = None,
               detail: Detail | None = None,
               names: Collection[str] | None = None) -> tuple[Iterator[bytes], str]:
    """The exposition of ``registry`` (and of the fleet in ``hives()``) in the format ``accept``
    asks for: OpenMetrics when the scraper asks for it (Prometheus does), else the classic text
    format; in parts (``fleet_parts``, some empty), and its content type. The fleet and
    ``registry`` are read at once, the parts written as they are taken. ``detail`` is asked
    before ``registry`` is written, so a gauge it sets is current. ``names`` (a scrape's
    ``name[]``, as prometheus-client's own handler takes it): only the samples of these names,
    and the fleet is not walked unless one of them is the fleet's."""
    encoder, content_type = choose_encoder(accept or "")
    if names is not None and not any(name.startswith(FLEET_PREFIXES) for name in names):
        hives = None
    records = None if hives is None else hives()
    listed = records is not None and (detail is None or detail(records))
    body = encoder(registry if names is None else _Named(registry, names))
    openmetrics = content_type.startswith("application/openmetrics-text")

    def parts() -> Iterator[bytes]:
        if records is None:
            yield body
            return
        yield body.removesuffix(b"# EOF\n") if openmetrics else body
        for part in fleet_parts(records, openmetrics, listed, names):
            yield part.encode()
        if openmetrics:
            yield b"# EOF\n"

    return parts(), content_type


class _Named:
    """``registry``'s samples named in ``names`` (by sample or family name), for an encoder:
    what prometheus-client's ``restricted_registry`` gives, custom collectors without a
    ``describe`` included (the queen's own have none)."""

    def __init__(self, registry: CollectorRegistry, names: Collection[str]) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            named = metric.name in self.names
            samples = [s for s in metric.samples if named or s.name in self.names]
            if samples:
                kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                kept.samples = samples
                yield kept


def render(registry: CollectorRegistry, accept: str | None,
           hives: Callable[[], list[HiveRecord]] | None = None,
           detail: Detail | None = None,
           names: Collection[str] | None = None) -> tuple[bytes, str]:
    """``exposition`` in one body."""
    parts, content_type = exposition(registry, accept, hives, detail, names)
    return b"".join(parts), content_type


def metrics_route(registry: CollectorRegistry,
                  hives: Callable[[], list[HiveRecord]],
                  guard: Callable[[Request], None] | None = None,
                  detail: Detail | None = None) -> Route:
    """``GET /metrics``: ``registry`` (the server's own figures) and the fleet in ``hives()``
    (each worker and GPU where ``detail`` says so); ``?name[]=...`` (repeated) selects samples by
    name, as prometheus-client's handler does: a check of the queen's own counters then costs
    nothing of the fleet. Written on the event loop part by part (``fleet_parts``), letting
    every ready task go between two, and sent as it is written: a worker thread would hold the
    GIL from the heartbeats for the whole of a large fleet's (over a second at 20,000 workers).
    ``guard`` may refuse the request first (raising ApiError)."""

    async def metrics(request: Request) -> Response:
        if guard is not None:
            guard(request)
        names = request.query_params.getlist("name[]") or None
        parts, content_type = exposition(registry, request.headers.get("accept"), hives,
                                         detail, None if names is None else frozenset(names))

        async def written() -> AsyncIterator[bytes]:
            for part in parts:
                if part:
                    yield part
                await trio.lowlevel.checkpoint()

        return StreamingResponse(written(), media_type=content_type)

    return Route(paths.METRICS, metrics, methods=["GET"])
