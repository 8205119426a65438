"""The fleet as ``rbee top`` sees it: the queen's live stream applied to a ``FleetView``, and the
workers' last minute from its history, both followed until cancelled.

The interactive view reads the view from another thread (textual runs on asyncio, the feed on
trio), so every change to it, and every read of it, holds ``lock``.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable

import httpx
import trio

from ..contract import StreamEvent, paths
from ..fleetview import TREND_METRICS, FleetView
from ..stream_client import follow_stream

HISTORY_EVERY_S = 5.0
"""How often the LAST 60s column is refreshed (one ``/v1/history`` request for the fleet)."""


class FleetFeed:
    """One queen's fleet. ``problem`` says why the stream is down (empty while it is up)."""

    def __init__(self, queen_url: str, verify: ssl.SSLContext | bool = True,
                 headers: dict[str, str] | None = None,
                 history_every_s: float = HISTORY_EVERY_S) -> None:
        self.queen_url = queen_url
        self.verify = verify
        self.headers = headers
        self.history_every_s = history_every_s
        self.view = FleetView()
        self.lock = threading.Lock()
        self.problem = ""
        self.streamed = False
        """True once the first event came: before it, the view is no fleet yet."""

    async def run(self, notify: Callable[[], None]) -> None:
        """Follow the queen forever, calling ``notify`` after each change of the view or of
        ``problem``. A trend alone is no fleet: nothing is notified before the first event."""

        def on_event(event: StreamEvent) -> None:
            with self.lock:
                self.view.apply(event)
                self.problem, self.streamed = "", True
            notify()

        def on_history(answer: dict) -> None:
            with self.lock:
                self.view.apply_history(answer)
            if self.streamed:
                notify()

        def on_down(problem: str) -> None:
            self.problem = f"{problem}; retrying"
            notify()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: follow_stream(self.queen_url, on_event, on_down=on_down,
                                                     verify=self.verify, headers=self.headers))
            nursery.start_soon(follow_history, self.queen_url, on_history, self.verify,
                               self.history_every_s, self.headers)


async def follow_history(queen_url: str, take: Callable[[dict], None],
                         verify: ssl.SSLContext | bool = True, every_s: float = HISTORY_EVERY_S,
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
                    take(response.json())
            except (httpx.HTTPError, ValueError):
                pass
            await trio.sleep(every_s)
