"""``rbee-queen``: run the queen.

    rbee-queen [--config queen.yaml] [--check-config] [--log-level INFO]

Without ``--config`` every default applies (``rbee/config.py`` lists them). The first line on
stdout names the bound address(es), so a supervisor or test that asked for port 0 learns the port.
SIGINT and SIGTERM stop it cleanly: streams end, requests in flight get ``http.shutdown_grace_s``.
"""

from __future__ import annotations

import sys

from .._daemon import run_daemon
from ..auth import read_token
from ..config import QueenConfig
from .server import QueenServer


def describe(config: QueenConfig, source: str) -> str:
    token = read_token(config.auth_token_file, source)
    store = config.registry.store
    where = f"the fleet in Redis at {store.url}" if store.kind == "redis" else "the fleet in memory"
    return (f"listening on {config.bind}:{config.port}, "
            f"{'hives need the token' if token else 'no token asked of hives'}, {where}")


def main(argv: list[str] | None = None) -> int:
    return run_daemon("rbee-queen", "the rbee telemetry queen", QueenConfig, QueenServer,
                      describe, argv)


if __name__ == "__main__":
    sys.exit(main())
