"""``rbee-queen``: run the queen.

    rbee-queen [--config queen.yaml] [--check-config] [--log-level INFO]

Without ``--config`` every default applies (``rbee/config.py`` lists them). The first line on
stdout names the bound address(es), so a supervisor or test that asked for port 0 learns the port.
SIGINT and SIGTERM stop it cleanly: streams end, requests in flight get ``http.shutdown_grace_s``.
"""

from __future__ import annotations

import sys

from .._daemon import run_daemon, settle_gc
from ..config import QueenConfig
from ..credentials import HiveCredentials
from ..http.auth import read_token
from ..http.tls import check_server_files
from .server import QueenServer


def describe(config: QueenConfig, source: str) -> str:
    token = read_token(config.auth_token_file, source)
    check_server_files(config.http, source)
    scheme = "https" if config.http.tls_cert_file else "http"
    credentials = (HiveCredentials(config.hive_credentials_file)
                   if config.hive_credentials_file else None)
    read = read_token(config.read_token_file, source, "read_token_file")
    writes = [f"{len(credentials)} hive credentials" if credentials is not None else "",
              "the token" if token else ""]
    asked = " or ".join(w for w in writes if w) or "no token"
    store = config.registry.store
    where = f"the fleet in Redis at {store.url}" if store.kind == "redis" else "the fleet in memory"
    return (f"listening on {scheme}://{config.bind}:{config.port}, hives need {asked}"
            f"{', reads need the read token' if read else ''}, {where}")


GC_THRESHOLDS = (100_000, 50, 1000)
"""Python's cyclic collector, run far less often than its default (700, 10, 10): a fleet queen holds
millions of long-lived objects (every hive's decoded heartbeat), and each full collection walked
them all while no heartbeat was answered: at 2,400 eight-GPU hives heartbeat p99 was 1.8 s with the
default and 65 ms with these (p50 1 s and 0.9 ms; docs/scale.md). Heartbeats make few cycles."""


def main(argv: list[str] | None = None) -> int:
    settle_gc(GC_THRESHOLDS)  # freezing what start-up loaded: 11 ms of a 10,000-hive full collection
    return run_daemon("rbee-queen", "the rbee telemetry queen", QueenConfig, QueenServer,
                      describe, argv)


if __name__ == "__main__":
    sys.exit(main())
