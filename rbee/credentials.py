"""Per-hive credentials: a secret for each hive, which lets it post, say goodbye and be removed
only as itself.

The queen keeps no secret, only one line per hive in ``hive_credentials_file``::

    # hive_id:scheme$salt$hash
    gpu-07:sha256$9f2c…$5be1…

``hash`` is the hex SHA-256 of ``salt + "$" + secret``. A salted SHA-256 is sound here, where a
slow password hash (scrypt, argon2) would be wasted: every secret is 256 random bits made by
``rbee credential new`` (or Ansible), not something a person chose, so there is no dictionary to
try and 2^256 guesses to make, and a stolen file gives nothing to replay. It is also cheap enough
to check on every heartbeat: 2.4 us where scrypt at the usual interactive cost takes 119 ms, which
a thousand hives a second could not afford (``bench/test_bench_credentials.py``, this 2-core
machine). The comparison is constant-time.

A hive sends ``Authorization: Basic base64(hive_id:secret)``: the hive id is in the header, so the
queen checks it before reading the body. The file is read again when its modification time or
size changes (checked at most once per ``reload_check_s``), so a credential is added or revoked
without a restart; a file that has become unreadable or malformed keeps the previous credentials
and is logged, so one bad edit does not lock the whole fleet out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from ._errors import ConfigError
from .contract import ID_MAX_CHARS, ID_PATTERN

log = logging.getLogger(__name__)

SCHEME = "sha256"
CREDENTIALS_KEY = "hive_credentials_file"
SECRET_KEY = "credential_file"
_HIVE_ID = re.compile(ID_PATTERN)
_HEX = re.compile(r"^[0-9a-f]+$")
MIN_SECRET_CHARS = 32


def is_hive_id(text: str) -> bool:
    return len(text) <= ID_MAX_CHARS and _HIVE_ID.match(text) is not None


def digest(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}${secret}".encode()).hexdigest()


def new_credential(hive_id: str) -> tuple[str, str]:
    """A fresh secret for ``hive_id`` (256 random bits) and its line for the credentials file."""
    if not is_hive_id(hive_id):
        raise ValueError(f"{hive_id!r} is not a hive id (letters, digits, '_', '.', '-', "
                         f"at most {ID_MAX_CHARS})")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return secret, f"{hive_id}:{SCHEME}${salt}${digest(salt, secret)}"


def parse_credentials(text: str, source: str) -> dict[str, tuple[str, str]]:
    """``{hive_id: (salt, hash)}`` from a credentials file's text. Raises ConfigError naming the
    file, the line and the problem."""
    found: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def problem(message: str, number: int = number) -> ConfigError:
            return ConfigError(f"line {number}: {message}", source=source, key=CREDENTIALS_KEY)

        hive_id, colon, rest = line.partition(":")
        if not colon or not is_hive_id(hive_id):
            raise problem("expected hive_id:sha256$salt$hash")
        parts = rest.split("$")
        scheme, salt, hashed = parts if len(parts) == 3 else ("", "", "")
        if scheme != SCHEME:
            raise problem(f"unknown or missing scheme in {rest[:20]!r}: only {SCHEME}$salt$hash")
        if not (salt and _HEX.match(salt)) or not (len(hashed) == 64 and _HEX.match(hashed)):
            raise problem("the salt and the hash must be lower-case hex, the hash 64 digits")
        if hive_id in found:
            raise problem(f"hive {hive_id!r} is listed twice")
        found[hive_id] = (salt, hashed)
    return found


class HiveCredentials:
    """The queen's view of ``hive_credentials_file``, read at start and again when it changes."""

    def __init__(self, path: str, *, reload_check_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.reload_check_s = reload_check_s
        self._clock = clock
        self._stamp = self._file_stamp()
        self._entries = self._read()  # at start a bad file is an error (ConfigError)
        self._checked_at = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, hive_id: str, secret: str) -> bool:
        """Whether ``secret`` is ``hive_id``'s, compared in constant time (an unknown hive costs
        the same hash)."""
        self.maybe_reload()
        salt, expected = self._entries.get(hive_id, ("", "0" * 64))
        return hmac.compare_digest(digest(salt, secret), expected) and hive_id in self._entries

    def maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < self.reload_check_s:
            return
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries = self._read()
        except ConfigError as exc:
            log.error("%s; keeping the %d credentials read before", exc, len(self._entries))
            return
        log.warning("re-read %s: %d hive credentials", self.path, len(self._entries))

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.path)
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def _read(self) -> dict[str, tuple[str, str]]:
        try:
            text = Path(self.path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}",
                              key=CREDENTIALS_KEY) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path} is not text", key=CREDENTIALS_KEY) from exc
        return parse_credentials(text, self.path)


def read_secret(path: str | None, source: str = "") -> str | None:
    """A hive's own secret from ``credential_file`` (None if not configured). Raises ConfigError
    naming the key for a file that cannot serve as one."""
    if path is None:
        return None

    def problem(message: str) -> ConfigError:
        return ConfigError(message, source=source, key=SECRET_KEY)

    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise problem(f"cannot read credential file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise problem(f"credential file {path} is not text") from exc
    if (len(secret) < MIN_SECRET_CHARS or not secret.isascii() or not secret.isprintable()
            or any(c.isspace() or c == ":" for c in secret)):
        raise problem(f"credential file {path} must hold one secret of at least "
                      f"{MIN_SECRET_CHARS} printable ASCII characters, no spaces or ':' "
                      f"(make one with `rbee credential new HIVE_ID`)")
    return secret
