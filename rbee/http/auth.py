"""The token a queen and its hives share: who may send heartbeats, remove hives, spawn and stop
workers.

It lives in a file of its own (``auth_token_file`` in either config), never in the YAML config, so
a config can be shown, diffed and logged (Ansible renders it with ``--diff``) while the token stays
in a file readable only by the service (and, in Ansible, in a Vault-encrypted variable). With no
token file configured nothing is checked, as before.

Two finer modes sit beside it on the queen:

- per-hive credentials (``hive_credentials_file``, ``rbee/credentials.py``): a hive sends
  ``Authorization: Basic base64(hive_id:secret)`` and may then post, say goodbye and be removed
  only as itself; the shared token stays an admin power that may act for any hive;
- a read token (``read_token_file``): the stream, the queries and ``/metrics`` then take
  ``Authorization: Bearer <read token>`` (or the shared token); the stream also takes
  ``?access_token=`` because a browser's EventSource cannot send a header. ``/health`` and the
  dashboard's own files stay open.

Every check happens before the body is read, and every secret is compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from pathlib import Path

from starlette.requests import Request

from .._errors import ConfigError
from ..credentials import HiveCredentials
from .errors import ApiError

MIN_TOKEN_CHARS = 16
TOKEN_KEY = "auth_token_file"


def read_token(path: str | None, source: str = "", key: str = TOKEN_KEY) -> str | None:
    """The token in ``path`` (surrounding whitespace stripped), None if no file is configured.
    Raises ConfigError naming ``key`` for a file that cannot serve as one."""
    if path is None:
        return None

    def problem(message: str) -> ConfigError:
        return ConfigError(message, source=source, key=key)

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


def hive_basic(hive_id: str, secret: str) -> dict[str, str]:
    """The request header that carries a hive's own credential."""
    pair = base64.b64encode(f"{hive_id}:{secret}".encode()).decode()
    return {"authorization": f"Basic {pair}"}


ANY_HIVE = None
"""What ``authenticate_hive`` returns for a caller that may act for any hive: the shared token's
holder, or anyone when the queen asks for nothing."""


def authenticate_hive(request: Request, token: str | None,
                      credentials: HiveCredentials | None) -> str | None:
    """The hive a write (heartbeat, goodbye, removal) may act as, or ``ANY_HIVE``; 401 otherwise.
    With neither a token nor credentials configured nothing is checked."""
    if token is None and credentials is None:
        return ANY_HIVE
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    what = f"{request.method} {request.url.path}"
    accepted = " or ".join(part for part in (
        "a hive credential (Authorization: Basic base64(hive_id:secret))" if credentials else "",
        "the shared token (Authorization: Bearer ...)" if token else "") if part)
    if scheme.lower() == "basic" and credentials is not None:
        hive_id, secret = _basic_pair(given.strip())
        if hive_id is None or not credentials.verify(hive_id, secret):
            raise ApiError(401, f"{what}: wrong credential for hive {hive_id!r} (not in this "
                                f"queen's hive_credentials_file)",
                           headers={"WWW-Authenticate": 'Basic realm="rbee"'})
        return hive_id
    if scheme.lower() == "bearer" and token is not None:
        require_token(request, token)
        return ANY_HIVE
    raise ApiError(401, f"{what} needs {accepted}",
                   headers={"WWW-Authenticate": "Basic realm=\"rbee\"" if credentials
                            else "Bearer"})


def require_reader(request: Request, read_token: str | None, token: str | None, *,
                   query_parameter: bool = False) -> None:
    """Refuse (401) a read without the read token (or the shared token); nothing is checked
    without a read token. ``query_parameter`` also accepts ``?access_token=`` (the stream)."""
    if read_token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if not given and query_parameter:
        given = request.query_params.get("access_token", "")
    what = f"{request.method} {request.url.path}"
    if not given:
        raise ApiError(401, f"{what} needs the read token (header Authorization: Bearer ...)",
                       headers={"WWW-Authenticate": "Bearer"})
    matches = hmac.compare_digest(given.encode(), read_token.encode())
    if token is not None:
        matches |= hmac.compare_digest(given.encode(), token.encode())
    if not matches:
        raise ApiError(401, f"{what}: wrong token (not this server's read token)",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _basic_pair(given: str) -> tuple[str | None, str]:
    try:
        hive_id, colon, secret = base64.b64decode(given, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    return (hive_id, secret) if colon else (None, "")


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
