"""``rbee-hive``: run a hive.

    rbee-hive [--config hive.yaml] [--check-config] [--log-level INFO]

The first line on stdout names the API's bound address(es). SIGINT and SIGTERM stop it cleanly:
with ``stop_workers_on_exit: false`` (the default) its workers keep running and the next hive
re-adopts them from the cgroup tree; with ``true`` they are stopped and their cgroups removed.
The queen URL is checked before anything starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .._daemon import run_daemon, settle_gc
from .._errors import ConfigError
from ..config import HiveConfig
from ..credentials import read_secret
from ..http.auth import read_token
from ..http.tls import check_server_files, client_verify
from ..plugin.declarations import configure_plugins, describe_plugins
from ..plugin.manager import build_plugin_manager
from .heartbeat import parse_queen_url
from .service import HiveService


def check(config: HiveConfig, source: str) -> str:
    """What start-up needs beyond the config's own syntax (limits, ids, the bind address): the
    queen URL, the token and credential files and the workers' log directory. Start-up runs it too, so
    ``--check-config`` passes exactly the configs a hive starts with."""
    for url in config.queen_urls:
        parse_queen_url(url, source=source)
    client_verify(config.queen_ca_file, "queen_ca_file", source)
    check_server_files(config.http, source)
    token = read_token(config.auth_token_file, source)
    secret = read_secret(config.credential_file, source)
    check_log_dir(config.log_dir, source)
    plugins = check_plugins(config, source)
    sent = " (with its credential)" if secret else " (with token)" if token else ""
    queens = ", ".join(config.queen_urls)
    return (f"hive {config.id!r}, API on {config.bind}:{config.port}, queen {queens}"
            f"{sent}, {len(config.workers)} workers, plugins: {plugins}")


def check_plugins(config: HiveConfig, source: str = "") -> str:
    """Load every plugin as the hive will and check what it declares and its config section;
    a PluginError or ConfigError names the plugin. Returns the third-party plugins, versioned."""
    manager = build_plugin_manager(config.collect.disabled_plugins)
    configure_plugins(manager, config.plugins, source)
    infos = describe_plugins(manager)
    return ", ".join(f"{info.name} {info.version}".rstrip() for info in infos) or "built-in only"


def check_log_dir(log_dir: str | None, source: str = "") -> None:
    """A ConfigError on ``log_dir`` unless it is a directory this hive can write to."""
    if log_dir is None:
        return
    path = Path(log_dir)
    problem = ("does not exist" if not path.exists() else "is not a directory"
               if not path.is_dir() else "is not writable by this user"
               if not os.access(path, os.W_OK | os.X_OK) else "")
    if problem:
        raise ConfigError(f"{log_dir} {problem}", source=source, key="log_dir")


GC_THRESHOLDS = (50_000, 50, 1000)
"""Python's cyclic collector, run far less often than its default (700, 10, 10), and the modules
loaded at start frozen out of it: with 100 engines polled at 20 Hz the hive allocates fast, and
each full collection walked every object it holds (50 ms, measured), a stall every engine
change then waited out. The poll makes few cycles."""


def main(argv: list[str] | None = None) -> int:
    settle_gc(GC_THRESHOLDS)
    return run_daemon("rbee-hive", "the rbee telemetry hive", HiveConfig, HiveService, check,
                      argv)


if __name__ == "__main__":
    sys.exit(main())
