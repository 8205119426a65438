"""``rbee up``: the demo, all in one process: a queen, a local hive with demo workers, and the
live view. The one place outside the queen's package that starts a queen."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib.resources import files

import msgspec
import trio
import yaml

from ..config import HiveConfig, QueenConfig, parse_config
from ..hive.service import HiveService
from ..queen.server import QueenServer
from ..top import watch
from . import DEMO_HIVE_PORT


def demo_config(queen_url: str, hive_port: int = DEMO_HIVE_PORT) -> HiveConfig:
    """The demo hive. It stops its workers when it ends, so it has nothing to re-adopt: its
    cgroup root is its own run's (``rbee.slice/demo-hive-<pid>``), and a demo beside another
    demo, or beside a real hive, shares no root with it (one live hive per root)."""
    source = files("rbee.demo") / "demo.yaml"
    config = parse_config(yaml.safe_load(source.read_text()), HiveConfig, str(source))
    cgroup = msgspec.structs.replace(config.cgroup, root=f"rbee.slice/{config.id}-{os.getpid()}")
    return msgspec.structs.replace(config, queen_url=queen_url, port=hive_port, cgroup=cgroup)


def demo_hive_port(args: argparse.Namespace) -> int:
    """``--hive-port``, else any free port when the queen's is ``--port 0``, else 7835: so
    ``rbee up --port 0`` never meets a busy port."""
    if args.hive_port is not None:
        return args.hive_port
    return 0 if args.port == 0 else DEMO_HIVE_PORT


async def up(args: argparse.Namespace) -> None:
    """Signals are taken from the first moment: one that comes while the queen and hive start is
    acted on as soon as they are up, so the demo workers are always stopped."""
    queen = QueenServer(parse_config({"port": args.port}, QueenConfig))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            queen_url = (await nursery.start(queen.run))[0]
            hive = HiveService(demo_config(queen_url, demo_hive_port(args)))
            hive_done = trio.Event()

            async def run_hive(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await hive.run(task_status=task_status)
                finally:
                    hive_done.set()

            hive_urls = await nursery.start(run_hive)
            print(f"rbee up: queen {queen_url}, hive {hive.config.id!r} (API {hive_urls[0]}, "
                  f"cgroup backend {hive.agent.monitor.backend.name}), "
                  f"{len(hive.config.workers)} demo workers. Ctrl-C stops everything.\n"
                  f"dashboard: {queen_url}/", flush=True)
            async with trio.open_nursery() as view:
                view.start_soon(_cancel_on_signal, signals, view.cancel_scope)
                await watch(queen_url, args.rounds)
                view.cancel_scope.cancel()
            hive.stop()  # its workers stop and their cgroups go before the queen does
            await hive_done.wait()
            queen.stop()


async def _cancel_on_signal(signals, scope: trio.CancelScope) -> None:
    async for signum in signals:
        print(f"rbee: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
        scope.cancel()
        return
