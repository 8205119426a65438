"""The token a queen and its hives share: who may send heartbeats, remove hives, spawn and stop
workers.

It lives in a file of its own (``auth_token_file`` in either config), never in the YAML config, so
a config can be shown, diffed and logged (Ansible renders it with ``--diff``) while the token stays
in a file readable only by the service (and, in Ansible, in a Vault-encrypted variable). Reads
(health, listings, the live stream) stay open, as a metrics endpoint is: ``bind`` decides who can
reach them. With no token file configured nothing is checked, as before.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.requests import Request

from ._errors import ConfigError
from ._http import ApiError

MIN_TOKEN_CHARS = 16
TOKEN_KEY = "auth_token_file"


def read_token(path: str | None, source: str = "") -> str | None:
    """The token in ``path`` (surrounding whitespace stripped), None if no file is configured.
    Raises ConfigError naming ``auth_token_file`` for a file that cannot serve as one."""
    if path is None:
        return None

    def problem(message: str) -> ConfigError:
        return ConfigError(message, source=source, key=TOKEN_KEY)

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise problem(f"cannot read token file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise problem(f"token file {path} is not text") from exc
    token = text.strip()
    if not token:
        raise problem(f"token file {path} is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise problem(f"token in {path} must be one word of printable ASCII characters")
    if len(token) < MIN_TOKEN_CHARS:
        raise problem(f"token in {path} is too short: {len(token)} characters, "
                      f"at least {MIN_TOKEN_CHARS}")
    return token


def bearer(token: str | None) -> dict[str, str]:
    """The request header that carries ``token`` (none without a token)."""
    return {"authorization": f"Bearer {token}"} if token else {}


def require_token(request: Request, token: str | None) -> None:
    """Refuse (401) a request that does not carry ``token``; nothing is checked without one."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    what = f"{request.method} {request.url.path}"
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, f"{what} needs the shared token (header Authorization: Bearer ...)",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, f"{what}: wrong token (not the one in this server's auth_token_file)",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
