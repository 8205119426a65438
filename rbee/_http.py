"""The HTTP layer's old home, kept as a re-export: it is the package ``rbee/http/`` now."""

from __future__ import annotations

from .contract import Reply, reply_message
from .http.app import JsonResponse, json_app, ok
from .http.bodies import BodyBudget, gunzip_limited, read_body
from .http.errors import ApiError
from .http.serving import serve

__all__ = ["ApiError", "BodyBudget", "JsonResponse", "Reply", "gunzip_limited", "json_app", "ok",
           "read_body", "reply_message", "serve"]
