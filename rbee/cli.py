"""``rbee``: the command line of rbee telemetry.

    rbee up     run the built-in demo on this machine: a local hive with demo workers, live view
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.resources import files

import trio
import yaml

from ._errors import RbeeError, leaf_exceptions
from .config import HiveConfig, parse_config
from .hive.agent import HiveAgent
from .view import table


def demo_config() -> HiveConfig:
    source = files("rbee.demo") / "demo.yaml"
    return parse_config(yaml.safe_load(source.read_text()), HiveConfig, str(source))


async def up(args: argparse.Namespace) -> None:
    config = demo_config()
    agent = HiveAgent(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        print(f"rbee up: hive {config.id!r}, cgroup backend {agent.monitor.backend.name}, "
              f"{len(config.workers)} demo workers. Ctrl-C stops everything.", flush=True)
        rounds = 0
        while args.rounds == 0 or rounds < args.rounds:
            heartbeat = await agent.wait_changed()
            rows = [(heartbeat.hive.id, w, "") for w in heartbeat.workers]
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            print(f"{clear}{heartbeat.timestamp:%H:%M:%S}  {len(rows)} workers\n{table(rows)}\n",
                  flush=True)
            rounds += 1
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee", description="rbee telemetry")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)
    run_up = commands.add_parser("up", help="run the demo: hive and demo workers, live view")
    run_up.add_argument("--rounds", type=int, default=0, help="stop after N updates (0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    status = 0
    try:
        trio.run(up, args)
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        print("rbee: stopped", file=sys.stderr)
    except* RbeeError as group:
        for exc in leaf_exceptions(group):
            print(f"rbee: {exc}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
