"""What ``rbee-queen`` and ``rbee-hive`` share as commands: the same options (``--config``,
``--check-config``, ``--log-level``), config errors on stderr with exit status 2, a first stdout
line naming the bound URLs, SIGINT/SIGTERM for a clean stop, and start-up failures (a taken port,
a cgroup tree it may not use) on stderr with exit status 1."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from ._errors import RbeeError, leaf_exceptions
from .config import Settings, load_config

log = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT", bound=Settings)


def settle_gc(thresholds: tuple[int, int, int]) -> None:
    """The cyclic collector set for a long-running daemon once its modules are loaded: run at
    ``thresholds`` (each daemon's ``GC_THRESHOLDS`` says why its own), and what exists now (the
    modules, ~50,000 objects) collected once and frozen out of every later collection
    (``gc.freeze``): a full collection walked them each time. They live as long as the process;
    nothing is lost but their scanning."""
    gc.set_threshold(*thresholds)
    gc.collect()
    gc.freeze()


class Service(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[list[str]]) -> None: ...

    def stop(self) -> None: ...


async def serve_until_signal(prog: str, service: Service) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(service.run)
            print(f"{prog}: listening on {' '.join(urls)}", flush=True)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                service.stop()
                break


def run_daemon(prog: str, description: str, config_type: type[ConfigT],
               service: Callable[[ConfigT], Service],
               check: Callable[[ConfigT, str], str], argv: list[str] | None = None) -> int:
    """Parse the command line, load and check the config (``check`` raises RbeeError or returns
    what --check-config prints), then run ``service(config)`` until a signal."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    source = args.config or ""
    try:
        config = load_config(args.config, config_type) if args.config else config_type()
        summary = check(config, source)
    except RbeeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{prog}: config OK ({source or 'defaults'}): {summary}")
        return 0
    status = 0
    try:
        trio.run(serve_until_signal, prog, service(config))
    except* (RbeeError, OSError) as group:
        for exc in leaf_exceptions(group):
            print(f"{prog}: {describe_failure(exc)}", file=sys.stderr)
        status = 1
    return status


def describe_failure(exc: BaseException) -> str:
    """A start-up failure in one line that names what failed: our errors say it themselves; an
    OSError names its file (a listening error is a ListenError, naming the address)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)
