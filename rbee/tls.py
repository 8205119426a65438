"""TLS for rbee's HTTP clients (the hive's heartbeats, ``rbee top``, ``rbee workers``): which
certificate authorities a queen's certificate is checked against."""

from __future__ import annotations

import ssl

from ._errors import ConfigError


def client_verify(ca_file: str | None, key: str = "ca_file") -> ssl.SSLContext | bool:
    """httpx's ``verify``: a context trusting only the CA bundle ``ca_file`` (PEM), or True (the
    system's CAs) when unset. A bundle that cannot be read is a ConfigError naming ``key``."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA bundle {ca_file}: {exc}", key=key) from exc
