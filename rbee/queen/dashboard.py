"""The fleet dashboard: ``GET /`` and ``/static/…``, files shipped in the package (no build step,
no CDN: management networks are often offline).

The page is read-only and takes everything from the queen's own endpoints (the SSE stream and
``/v1/history``), so its Content-Security-Policy allows nothing but this origin: no inline script or
style, no other host, no framing. The page and its scripts are revalidated on every load (their
names carry no version, so a cached copy could outlive an upgrade of the queen); the vendored
library changes only when it is re-vendored, so a day's caching is safe.
"""

from __future__ import annotations

from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
REVALIDATE = "no-cache"
VENDOR_MAX_AGE = "public, max-age=86400"


class _WithHeaders:
    """Adds the security headers and a cache policy to every response of ``app``."""

    def __init__(self, app: ASGIApp, cache_control: str) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in
                        {**SECURITY_HEADERS, "cache-control": cache_control}.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k for k, _ in self.headers}
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if k.lower() not in names] + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def dashboard_routes() -> list[BaseRoute]:
    """``/`` (the page) and ``/static/`` (its scripts, styles and the vendored uPlot)."""
    static = StaticFiles(packages=[("rbee.queen", "static")])
    index_path = static.lookup_path("index.html")[0]

    async def index(scope: Scope, receive: Receive, send: Send) -> None:
        page = FileResponse(index_path, media_type="text/html; charset=utf-8")
        await page(scope, receive, send)

    return [
        Route("/", _WithHeaders(index, REVALIDATE), methods=["GET", "HEAD"]),
        Mount("/static/vendor", _WithHeaders(
            StaticFiles(packages=[("rbee.queen", "static/vendor")]), VENDOR_MAX_AGE)),
        Mount("/static", _WithHeaders(static, REVALIDATE)),
    ]

