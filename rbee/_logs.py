"""Log lines about what clients send: rate-limited, with untrusted text quoted.

A client that sends garbage a thousand times a second must not write a thousand lines a second,
nor forge lines of its own: every string that came from a client goes into the log through
``repr`` (a newline or an escape sequence shows as ``\\n``, ``\\x1b``), and ``RateLimitedLog``
lets through ``burst`` lines per ``window_s`` and then one line saying how many it held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, *, burst: int = 10, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = -window_s
        self._in_window = 0
        self.suppressed = 0
        """Lines held back in the current window (told when the next window opens)."""

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            if now - self._window_start >= self.window_s:
                held_back, self.suppressed = self.suppressed, 0
                self._window_start, self._in_window = now, 0
                if held_back:
                    self.logger.warning("%d more like it in the last %gs not logged", held_back,
                                        self.window_s)
            if self._in_window >= self.burst:
                self.suppressed += 1
                return
            self._in_window += 1
        self.logger.warning(message, *args)
