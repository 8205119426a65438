"""A program in a real terminal: tmux on a socket of its own, a window of a fixed size, keys sent
with ``send-keys`` and the screen read with ``capture-pane``, as an operator would see it.

Where tmux is missing the test is skipped naming the package, except under ``CI=true``, where it
fails (``./dev test`` installs Debian's tmux). Every wait polls the screen against a deadline (never a fixed sleep), and ``terminal`` kills its
tmux server on the way out, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

TMUX = shutil.which("tmux")


def require_tmux() -> None:
    """Skip naming the package where tmux is missing; under ``CI=true``, fail instead."""
    if not TMUX:
        missing = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
        missing("needs Debian's tmux package: apt-get install tmux (./dev test installs it)")


class Terminal:
    """One tmux window running one command, on a tmux server of its own (its socket in a
    temporary folder, removed with it)."""

    def __init__(self, socket: str, status_file: Path) -> None:
        self.socket = socket
        self.status_file = status_file

    def tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-S", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def screen(self) -> list[str]:
        """The window's lines as shown now (trailing blanks removed)."""
        return [line.rstrip() for line in self.tmux("capture-pane", "-p", "-t", "top").splitlines()]

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "top", *(["-l"] if literal else []), *keys)

    def ended(self) -> int | None:
        """The command's exit status once it has ended, else None. The shell around the
        command writes it: tmux's own ``pane_dead_status`` is sometimes never filled in when
        the terminal closes before the process is reaped."""
        try:
            status = self.status_file.read_text()
        except FileNotFoundError:
            return None
        return int(status) if status.endswith("\n") else None

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0,
                    what: str = "the expected screen") -> list[str]:
        """The first screen for which ``predicate`` holds; on timeout, an error showing the
        last screen."""
        lines: list[str] = []
        with trio.move_on_after(timeout):
            while True:
                lines = await trio.to_thread.run_sync(self.screen)
                if predicate(lines):
                    return lines
                await trio.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout} s; the screen:\n" + "\n".join(lines))

    async def exit_status(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while (status := await trio.to_thread.run_sync(self.ended)) is None:
                await trio.sleep(0.1)
            return status


@asynccontextmanager
async def terminal(argv: Sequence[str], columns: int, lines: int,
                   env: dict[str, str] | None = None) -> AsyncIterator[Terminal]:
    """``argv`` in a ``columns`` x ``lines`` tmux window; its server is killed on exit."""
    require_tmux()
    folder = tempfile.TemporaryDirectory(prefix="rbee-tmux-")
    term = Terminal(f"{folder.name}/tmux.sock", Path(folder.name) / "status")
    command = " ".join(shlex.quote(a) for a in argv)
    setenv = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    config = Path(folder.name) / "tmux.conf"
    # before the command starts: the screen stays readable after it ends (a traceback), and
    # no status line, so the window is all the command's
    config.write_text(f"set -g remain-on-exit on\nset -g status off\nset -g default-size {columns}x{lines}\n")
    try:
        term.tmux("-f", str(config), "new-session", "-d", "-s", "top", "-x", str(columns),
                  "-y", str(lines),
                  f"env -u COLUMNS -u LINES TERM=xterm-256color {setenv} {command}; "
                  f"echo $? > {shlex.quote(str(term.status_file))}.new && "
                  f"mv {shlex.quote(str(term.status_file))}.new {shlex.quote(str(term.status_file))}")
        yield term
    finally:
        subprocess.run([TMUX, "-S", term.socket, "kill-server"], capture_output=True,
                       timeout=10)
        folder.cleanup()
