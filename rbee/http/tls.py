"""TLS for rbee's HTTP clients (the hive's heartbeats, ``rbee top``, ``rbee workers``): which
certificate authorities a queen's certificate is checked against."""

from __future__ import annotations

import ssl

from .._errors import ConfigError
from ..config import HttpSettings


def client_verify(ca_file: str | None, key: str = "ca_file",
                  source: str = "") -> ssl.SSLContext | bool:
    """httpx's ``verify``: a context trusting only the CA bundle ``ca_file`` (PEM), or True (the
    system's CAs) when unset. A bundle that cannot be read is a ConfigError naming ``key``."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA bundle {ca_file}: {exc}", source=source,
                          key=key) from exc


def check_server_files(http: HttpSettings, source: str = "") -> None:
    """A ConfigError on ``http.tls_cert_file`` unless the certificate and key load (and match):
    ``--check-config`` and start-up refuse what the server could not serve."""
    if http.tls_cert_file is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            http.tls_cert_file, http.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the certificate {http.tls_cert_file} with the key "
                          f"{http.tls_key_file}: {exc}", source=source,
                          key="http.tls_cert_file") from exc
