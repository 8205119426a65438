"""``rbee-hive``: run a hive.

    rbee-hive [--config hive.yaml] [--check-config] [--log-level INFO]

The first line on stdout names the API's bound address(es). SIGINT and SIGTERM stop it cleanly:
with ``stop_workers_on_exit: false`` (the default) its workers keep running and the next hive
re-adopts them from the cgroup tree; with ``true`` they are stopped and their cgroups removed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from .._errors import RbeeError, leaf_exceptions
from ..config import HiveConfig, load_config
from .heartbeat import parse_queen_url
from .service import HiveService

log = logging.getLogger(__name__)


async def serve_until_signal(hive: HiveService) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(hive.run)
            print(f"rbee-hive: listening on {' '.join(urls)}", flush=True)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                hive.stop()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee-hive", description="the rbee telemetry hive")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    try:
        config = load_config(args.config, HiveConfig) if args.config else HiveConfig()
        parse_queen_url(config.queen_url, source=args.config or "")
    except RbeeError as exc:
        print(f"rbee-hive: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"rbee-hive: config OK ({args.config or 'defaults'}): hive {config.id!r}, "
              f"API on {config.bind}:{config.port}, queen {config.queen_url}, "
              f"{len(config.workers)} workers")
        return 0
    status = 0
    try:
        hive = HiveService(config)
        trio.run(serve_until_signal, hive)
    except* (RbeeError, OSError) as group:
        for exc in leaf_exceptions(group):
            print(f"rbee-hive: {exc}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
