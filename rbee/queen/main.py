"""``rbee-queen``: run the queen.

    rbee-queen [--config queen.yaml] [--check-config] [--log-level INFO]

Without ``--config`` every default applies (``rbee/config.py`` lists them). The first line on
stdout names the bound address(es), so a supervisor or test that asked for port 0 learns the port.
SIGINT and SIGTERM stop it cleanly: streams end, requests in flight get ``http.shutdown_grace_s``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from .._errors import RbeeError, leaf_exceptions
from ..config import QueenConfig, load_config
from .server import QueenServer

log = logging.getLogger(__name__)


async def serve_until_signal(config: QueenConfig) -> None:
    queen = QueenServer(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(queen.run)
            print(f"rbee-queen: listening on {' '.join(urls)}", flush=True)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                queen.stop()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee-queen", description="the rbee telemetry queen")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, print it and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    try:
        config = load_config(args.config, QueenConfig) if args.config else QueenConfig()
    except RbeeError as exc:
        print(f"rbee-queen: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"rbee-queen: config OK ({args.config or 'defaults'}): "
              f"listening on {config.bind}:{config.port}")
        return 0
    status = 0
    try:
        trio.run(serve_until_signal, config)
    except* OSError as group:  # e.g. the port is taken
        for exc in leaf_exceptions(group):
            reason = exc.strerror if isinstance(exc, OSError) else exc
            print(f"rbee-queen: cannot listen on {config.bind}:{config.port}: {reason}",
                  file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
