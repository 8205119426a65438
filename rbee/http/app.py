"""Starlette apps whose every answer is JSON: replies, errors, and errors mapped to statuses by
their type.

Every error a client gets is JSON ``{"status": "error", "message": ...}``, Starlette's own (unknown
path, wrong method) included, so a program can always read why. A handler raises ``ApiError`` for
a status of its own choosing, or lets one of rbee's errors through: the app's ``statuses`` table
answers it by type (the nearest class in its MRO), never by its text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from .._errors import ContractError
from .._logs import RateLimitedLog
from ..config import HttpSettings
from ..contract import Reply, encode
from .bodies import BODY_READ, BodyBudget
from .errors import ApiError

Statuses = Mapping[type[Exception], int]
"""The status each error type answers, beside ``ApiError`` (its own) and ``ContractError``
(400): the nearest class of the error's MRO in the table wins."""


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return encode(content)


def ok(message: str, status_code: int = 200) -> JsonResponse:
    return JsonResponse(Reply(status="ok", message=message), status_code=status_code)


class Refusals:
    """What a refused request is answered, logged (rate-limited, quoted): one table for the
    Starlette app and for the routes a connection answers itself (``rbee/http/rawpost.py``), so
    an error reads the same whichever path served it."""

    def __init__(self, client_errors: RateLimitedLog, statuses: Statuses) -> None:
        self.client_errors, self.statuses = client_errors, statuses

    def answer(self, exc: Exception, client: str, method: str, path: str
               ) -> tuple[int, bytes, dict[str, str] | None]:
        """The status, JSON body and extra headers answering ``exc`` (an ``ApiError`` or an
        error in the table), logged with the client (``host:port``) and the request line."""
        headers = None
        if isinstance(exc, ApiError):
            status_code, message, headers = exc.status_code, exc.message, exc.headers
        elif isinstance(exc, HTTPException):
            status_code = exc.status_code
            message = f"{method} {path}: {exc.detail.lower()}"
        else:
            status_code, message = _status_of(exc, self.statuses), str(exc)
        self.client_errors.warning("%s %s %r: %d %r", client, method, path, status_code, message)
        return status_code, encode(Reply(status="error", message=message)), headers

    def handler(self, request: Request, exc: Exception) -> Response:
        """Starlette's exception handler. A request whose body was not read to its end gets
        ``Connection: close``: the unread rest of the body would otherwise be taken for the
        client's next request on that connection."""
        client = request.client
        status_code, body, headers = self.answer(
            exc, f"{client.host}:{client.port}" if client else "-", request.method,
            request.url.path)
        if _has_body(request) and not request.scope.get(BODY_READ, False):
            headers = {**(headers or {}), "connection": "close"}
        return Response(body, status_code=status_code, headers=headers,
                        media_type=JsonResponse.media_type)


def _status_of(exc: Exception, statuses: Statuses) -> int:
    for kind in type(exc).__mro__:
        if kind in statuses:
            return statuses[kind]
    raise AssertionError(f"no status for {type(exc).__name__}")  # json_app registers only these


def internal_error_body(exc: Exception) -> bytes:
    """The JSON of a 500: a bug of ours still answers JSON (the traceback goes to the log)."""
    return encode(Reply(status="error", message=f"internal error ({type(exc).__name__}); "
                                                 f"the server's log has the details"))


def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours (the traceback goes to the log, once, by the server that sees the exception
    re-raised)."""
    return Response(internal_error_body(exc), status_code=500, headers={"connection": "close"},
                    media_type=JsonResponse.media_type)


def _has_body(request: Request) -> bool:
    headers = request.headers
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def json_app(routes: Sequence[BaseRoute], http: HttpSettings | None = None,
             statuses: Statuses | None = None) -> Starlette:
    """A Starlette app whose every answer is JSON; refused requests are logged by
    ``rbee.http.clients``, at most 10 lines per 10 s per app. ``http`` gives ``read_body`` its
    shared budget and deadline (the defaults without it); ``statuses``, the status of each of
    rbee's errors a handler lets through."""
    statuses = {ContractError: 400, **(statuses or {})}
    refusals = Refusals(RateLimitedLog(logging.getLogger("rbee.http.clients")), statuses)
    handlers: dict = dict.fromkeys([*statuses, ApiError, HTTPException], refusals.handler)
    app = Starlette(routes=list(routes),
                    exception_handlers={**handlers, Exception: _internal_error})
    http = http or HttpSettings()
    app.state.body_budget = BodyBudget(http.body_budget)
    app.state.body_timeout_s = http.body_timeout_s
    app.state.refusals = refusals
    app.state.raw_posts = {}  # paths whose POST a connection answers itself (rawpost.py)
    return app
