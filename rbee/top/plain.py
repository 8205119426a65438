"""``rbee top --plain`` (and ``--rounds``, and ``rbee up``'s live view): the fleet printed as
text whenever it changes. On a terminal each table fits its width (``fit`` drops columns, never
wraps); into a pipe or a file every column is printed."""

from __future__ import annotations

import shutil
import ssl
import sys
from collections.abc import Sequence

import trio

from ..columns import with_metrics
from ..terminal import WORKER_COLUMNS, printable
from .feed import FleetFeed

CLEAR = "\x1b[H\x1b[2J"


async def watch(queen_url: str, rounds: int = 0, refresh_s: float = 0.5,
                verify: ssl.SSLContext | bool = True,
                headers: dict[str, str] | None = None, metrics: Sequence[str] = ()) -> None:
    """Print the fleet whenever it changes (at most every ``refresh_s``); ``rounds`` > 0 stops
    after that many tables. ``headers`` go with every request (the read token); ``metrics``
    are plugin figures shown as columns."""
    feed = FleetFeed(queen_url, verify, headers)
    columns = with_metrics(WORKER_COLUMNS, metrics)
    changed = trio.Event()

    def notify() -> None:
        changed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run, notify)
        shown = 0
        while rounds == 0 or shown < rounds:
            await changed.wait()
            changed = trio.Event()
            tty = sys.stdout.isatty()
            width = shutil.get_terminal_size().columns if tty else None
            status = f"  [{feed.problem}]" if feed.problem else ""
            with feed.lock:
                text = feed.view.render(width, columns)
            clear = CLEAR if tty else ""
            print(f"{clear}rbee: queen {queen_url}{printable(status)}\n{text}\n", flush=True)
            shown += 1
            await trio.sleep(refresh_s)
        nursery.cancel_scope.cancel()
