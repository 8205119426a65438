"""``rbee-queen`` and ``rbee-hive`` as real child processes, for end-to-end tests.

Each runs from a YAML config written for the test (port 0: the process prints the port it got),
with its stderr captured for assertions. On exit, whatever happened in the test, the process gets
SIGTERM, then SIGKILL; a hive's cgroup root is then emptied and removed, so a failing test leaves
no worker or cgroup behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from rbee.hive.cgroups import select_backend

BIN = Path(sys.executable).parent


def end_process(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM,
                timeout: float = 10.0) -> int:
    """Send ``sig`` to a child still running, then SIGKILL if it outlives ``timeout``."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class Daemon:
    def __init__(self, command: str, config_path: Path, config_text: str, *,
                 env: dict[str, str] | None = None, cgroup_root: str | None = None) -> None:
        """``command`` from this environment, with ``config_text`` written to ``config_path``."""
        config_path.write_text(config_text)
        self._start([str(BIN / command), "--config", str(config_path), "--log-level", "INFO"],
                    config_path.with_suffix(".stderr"), env, cgroup_root)

    @classmethod
    def from_argv(cls, argv: list[str], stderr_path: Path, *, cgroup_root: str | None = None,
                  env: dict[str, str] | None = None) -> Daemon:
        """Exactly the command line ``argv`` (say, a systemd unit's ExecStart)."""
        daemon = cls.__new__(cls)
        daemon._start(argv, stderr_path, env, cgroup_root)
        return daemon

    def _start(self, argv: list[str], stderr_path: Path, env: dict[str, str] | None,
               cgroup_root: str | None) -> None:
        self.cgroup_root = cgroup_root
        self.stderr_path = stderr_path
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr,
                                        text=True, env=env)

    def __enter__(self) -> Daemon:
        line = self.process.stdout.readline()
        assert " listening on http" in line, (line, self.stderr())
        self.url = line.split()[-1]
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.process.stdout.close()
        self._stderr.close()
        if self.cgroup_root is not None:
            clear_cgroup_root(self.cgroup_root)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int:
        return end_process(self.process, sig, timeout)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            while self.process.poll() is None:
                await trio.sleep(0.02)
        return self.process.returncode

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()


def clear_cgroup_root(root: str) -> None:
    """Kill every worker left under a hive's cgroup root and remove the root."""
    backend = select_backend("auto", root)
    for group, instance in backend.enumerate():
        backend.kill(group, instance, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while backend.pids(group, instance) and time.monotonic() < deadline:
            time.sleep(0.01)
        backend.remove(group, instance)
    backend.remove_root()
