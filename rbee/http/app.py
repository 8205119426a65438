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


def _error_handler(client_errors: RateLimitedLog, statuses: Statuses):
    def error(request: Request, exc: Exception) -> Response:
        """The JSON answer to a refused request, logged (rate-limited, quoted). A request whose
        body was not read to its end gets ``Connection: close``: the unread rest of the body
        would otherwise be taken for the client's next request on that connection."""
        headers = None
        if isinstance(exc, ApiError):
            status_code, message, headers = exc.status_code, exc.message, exc.headers
        elif isinstance(exc, HTTPException):
            status_code = exc.status_code
            message = f"{request.method} {request.url.path}: {exc.detail.lower()}"
        else:
            status_code, message = _status_of(exc, statuses), str(exc)
        if _has_body(request) and not request.scope.get(BODY_READ, False):
            headers = {**(headers or {}), "connection": "close"}
        client = request.client
        client_errors.warning("%s %s %r: %d %r",
                              f"{client.host}:{client.port}" if client else "-",
                              request.method, request.url.path, status_code, message)
        return JsonResponse(Reply(status="error", message=message), status_code=status_code,
                            headers=headers)

    return error


def _status_of(exc: Exception, statuses: Statuses) -> int:
    for kind in type(exc).__mro__:
        if kind in statuses:
            return statuses[kind]
    raise AssertionError(f"no status for {type(exc).__name__}")  # json_app registers only these


def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours: the client still gets JSON (the traceback goes to the log, once, by the
    server that sees the exception re-raised)."""
    return JsonResponse(Reply(status="error", message=f"internal error ({type(exc).__name__}); "
                                                      f"the server's log has the details"),
                        status_code=500, headers={"connection": "close"})


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
    error = _error_handler(RateLimitedLog(logging.getLogger("rbee.http.clients")), statuses)
    handlers: dict = dict.fromkeys([*statuses, ApiError, HTTPException], error)
    app = Starlette(routes=list(routes),
                    exception_handlers={**handlers, Exception: _internal_error})
    http = http or HttpSettings()
    app.state.body_budget = BodyBudget(http.body_budget)
    app.state.body_timeout_s = http.body_timeout_s
    return app
