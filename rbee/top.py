"""``rbee top``: the live view of the fleet, from the queen's stream and its history."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable

import httpx
import trio

from .contract import StreamEvent, paths
from .fleetview import TREND_METRICS, FleetView
from .stream_client import follow_stream
from .terminal import printable


async def watch(queen_url: str, rounds: int = 0, refresh_s: float = 0.5,
                verify: ssl.SSLContext | bool = True,
                headers: dict[str, str] | None = None) -> None:
    """Print the fleet whenever it changes (at most every ``refresh_s``); ``rounds`` > 0 stops
    after that many tables. ``headers`` go with every request (the read token)."""
    view = FleetView()
    changed = trio.Event()
    status = ""
    streamed = False

    def on_event(event: StreamEvent) -> None:
        nonlocal status, streamed
        view.apply(event)
        status, streamed = "", True
        changed.set()

    def on_history() -> None:
        if streamed:  # a trend alone is no fleet: the first table waits for the snapshot
            changed.set()

    def on_down(problem: str) -> None:
        nonlocal status
        status = f"  [{problem}; retrying]"
        changed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: follow_stream(queen_url, on_event, on_down=on_down,
                                                 verify=verify, headers=headers))
        nursery.start_soon(follow_history, queen_url, view, on_history, verify, 5.0, headers)
        shown = 0
        while rounds == 0 or shown < rounds:
            await changed.wait()
            changed = trio.Event()
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            print(f"{clear}rbee: queen {queen_url}{printable(status)}\n{view.render()}\n",
                  flush=True)
            shown += 1
            await trio.sleep(refresh_s)
        nursery.cancel_scope.cancel()


async def follow_history(queen_url: str, view: FleetView, notify: Callable[[], None],
                         verify: ssl.SSLContext | bool = True, every_s: float = 5.0,
                         headers: dict[str, str] | None = None) -> None:
    """The workers' last minute for the LAST 60s column, every ``every_s``. Best effort: an old
    queen without history, or one that is down, leaves the column blank."""
    params = {"metric": TREND_METRICS, "since": "60", "step": "5"}
    async with httpx.AsyncClient(base_url=queen_url, timeout=every_s, verify=verify,
                                 headers=headers) as client:
        while True:
            try:
                response = await client.get(paths.HISTORY, params=params)
                if response.status_code == 200:
                    view.apply_history(response.json())
                    notify()
            except (httpx.HTTPError, ValueError):
                pass
            await trio.sleep(every_s)
