"""A small router in front of an rbee fleet: asks the queen which worker should take each request,
and forwards it there, streaming the answer back.

    python examples/router/router.py --queen http://queen:7700 [--port 8080] [--token-file F]

For each OpenAI-style ``POST /v1/completions`` or ``POST /v1/chat/completions`` it reads the
body's ``model``, asks the queen ``GET /v1/pick?model=M&n=2`` (the best worker first, then a
fallback), and sends the request to the first one's ``endpoint`` (its server's base URL: the
request's path is appended). The answer (a stream of Server-Sent Events, or one JSON body) is
passed back as it arrives, with ``x-rbee-worker: hive/group/instance`` saying who served it. A
worker that refuses the connection is skipped for the next pick; anything after the request
went out is the worker's answer, passed back as it is (a request is never sent twice).

The queen counts each pick in flight on its worker until that engine's own counters move, so
picks in a row spread over the workers even between two engine readings. Errors: 400 for a body
without a model, 503 with the queen's reason when it has no worker to offer, 502 when the queen
or every picked worker cannot be reached.

trio, hypercorn (trio worker), Starlette and httpx: the queen's own stack, nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("rbee.router")

COMPLETIONS = ("/v1/completions", "/v1/chat/completions")
PASSED_HEADERS = ("content-type", "cache-control")


def error(status: int, message: str) -> JSONResponse:
    """OpenAI's error shape, so clients of the engines read the router's errors the same way."""
    return JSONResponse({"error": {"message": message, "type": "router_error", "code": status}},
                        status_code=status)


class Router:
    """The proxy: one pooled httpx client for the queen and the workers alike."""

    def __init__(self, queen_url: str, token: str | None = None, *, pick_timeout_s: float = 1.0,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 600.0,
                 fallbacks: int = 1) -> None:
        self.queen_url = queen_url.rstrip("/")
        self.fallbacks = fallbacks
        self.pick_timeout_s = pick_timeout_s
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.queen_headers = headers
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=connect_timeout_s,
            pool=connect_timeout_s), limits=httpx.Limits(max_connections=1000),
            trust_env=False)
        self.app = Starlette(routes=[
            *(Route(path, self.forward, methods=["POST"]) for path in COMPLETIONS),
            Route("/health", self.health, methods=["GET"])])
        self.served: dict[str, int] = {}
        """Requests forwarded per worker (hive/group/instance), for logs and tests."""

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "queen": self.queen_url, "served": self.served})

    async def pick(self, model: str) -> list[dict] | Response:
        """The queen's picks for ``model``, best first, or the error response to give."""
        try:
            answer = await self.http.get(f"{self.queen_url}/v1/pick", headers=self.queen_headers,
                                         params={"model": model, "n": 1 + self.fallbacks},
                                         timeout=self.pick_timeout_s)
        except httpx.HTTPError as exc:
            return error(502, f"queen {self.queen_url} unreachable: {type(exc).__name__}: {exc}")
        if answer.status_code != 200:
            try:
                reason = answer.json()["message"]  # the queen's error body
            except (ValueError, KeyError, TypeError):
                reason = answer.text[:200]
            status = answer.status_code if answer.status_code in (400, 503) else 502
            return error(status, f"queen: {reason}")
        return answer.json()["picked"]

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        if not isinstance(model, str) or not model:
            return error(400, "the body must be a JSON object with a 'model'")
        picked = await self.pick(model)
        if isinstance(picked, Response):
            return picked
        problems = []
        for worker in picked:
            name = f"{worker['hive_id']}/{worker['group']}/{worker['instance']}"
            upstream = self.http.build_request(
                "POST", worker["endpoint"].rstrip("/") + request.url.path, content=body,
                headers={"content-type": request.headers.get("content-type",
                                                             "application/json")})
            try:
                response = await self.http.send(upstream, stream=True)
            except httpx.ConnectError as exc:  # nothing was sent: the next pick may take it
                problems.append(f"{name}: {exc}")
                log.warning("worker %s refused the connection: %s", name, exc)
                continue
            except httpx.HTTPError as exc:
                return error(502, f"worker {name}: {type(exc).__name__}: {exc}")
            self.served[name] = self.served.get(name, 0) + 1
            headers = {key: response.headers[key] for key in PASSED_HEADERS
                       if key in response.headers}
            headers["x-rbee-worker"] = name
            return StreamingResponse(self._relay(response), status_code=response.status_code,
                                     headers=headers, background=BackgroundTask(response.aclose))
        return error(502, "no picked worker could be reached: " + "; ".join(problems))

    @staticmethod
    async def _relay(response: httpx.Response):
        """The worker's bytes as they come (each SSE event as the engine flushes it)."""
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the worker went away mid-answer: end the stream
            log.warning("worker answer cut short: %s", exc)

    async def aclose(self) -> None:
        await self.http.aclose()


async def run(router: Router, host: str, port: int, *,
              task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``router`` until cancelled; reports its base URL once listening (port 0: a free one)."""
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1.0

    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, router.app, config))
            task_status.started(binds[0])
    finally:
        with trio.CancelScope(shield=True):
            await router.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queen", required=True, help="the queen's base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file", help="the queen's API token, if it asks for one")
    parser.add_argument("--fallbacks", type=int, default=1,
                        help="further picks tried when a worker refuses the connection")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = None
    if args.token_file:
        with open(args.token_file) as file:
            token = file.read().strip()
    router = Router(args.queen, token, fallbacks=args.fallbacks)
    trio.run(partial(run, router, args.host, args.port))


if __name__ == "__main__":
    main()
