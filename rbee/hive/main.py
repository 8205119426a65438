"""``rbee-hive``: run a hive.

    rbee-hive [--config hive.yaml] [--check-config] [--log-level INFO]

The first line on stdout names the API's bound address(es). SIGINT and SIGTERM stop it cleanly:
with ``stop_workers_on_exit: false`` (the default) its workers keep running and the next hive
re-adopts them from the cgroup tree; with ``true`` they are stopped and their cgroups removed.
The queen URL is checked before anything starts.
"""

from __future__ import annotations

import sys

from .._daemon import run_daemon
from ..auth import read_token
from ..config import HiveConfig
from .heartbeat import parse_queen_url
from .service import HiveService


def check(config: HiveConfig, source: str) -> str:
    parse_queen_url(config.queen_url, source=source)
    token = read_token(config.auth_token_file, source)
    return (f"hive {config.id!r}, API on {config.bind}:{config.port}, queen {config.queen_url}"
            f"{' (with token)' if token else ''}, {len(config.workers)} workers")


def main(argv: list[str] | None = None) -> int:
    return run_daemon("rbee-hive", "the rbee telemetry hive", HiveConfig, HiveService, check,
                      argv)


if __name__ == "__main__":
    sys.exit(main())
