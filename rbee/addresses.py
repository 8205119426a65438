"""Addresses as a config writes them: a listen address (``bind``) and a Redis URL, checked for
their syntax when the config is read, so a typo fails ``--check-config`` rather than a start."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import msgspec

REDIS_SCHEMES = ("redis", "rediss")

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


def check_bind(bind: str) -> None:
    """Raise ValueError unless ``bind`` is an IP address or a host name (the listen address's
    syntax; whether it is this machine's is only known when listening)."""
    try:
        ipaddress.ip_address(bind)
        return
    except ValueError:
        pass
    labels = bind.removesuffix(".").split(".")
    if len(bind) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"bind {bind!r} is neither an IP address nor a host name")


class RedisAddress(msgspec.Struct, frozen=True):
    host: str
    port: int
    db: int
    tls: bool


def parse_redis_url(url: str) -> RedisAddress:
    """``redis[s]://host[:port][/db]``, or ValueError saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"url {url!r}: {exc}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(f"url {url!r}: the scheme must be redis or rediss")
    if not parts.hostname:
        raise ValueError(f"url {url!r}: no host")
    if parts.username or parts.password or parts.query:
        raise ValueError(f"url {url!r}: credentials and options are not taken from the url")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"url {url!r}: the path must be a database number, not {db!r}")
    return RedisAddress(host=parts.hostname, port=port, db=int(db), tls=parts.scheme == "rediss")
