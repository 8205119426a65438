"""A real Redis for the tests: Debian's ``redis-server`` on a free 127.0.0.1 port, its files in a
temporary directory, no persistence; stopped (and its directory removed) when the test is done.

``./dev test`` installs the package when it is missing and it can; without it these tests fail
naming it (a skip would hide a missing feature)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .daemons import end_process
from .queenkit import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        assert Path(REDIS_SERVER).exists(), (
            "the redis store's tests need Debian's redis-server: apt-get install redis-server")
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            assert self.process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: Redis lost, with everything it held (no persistence)."""
        if self.process is not None:
            end_process(self.process, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict (memory, cpu), over a plain socket."""
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while not data or len(data) < int(data.split(b"\r\n", 1)[0][1:]) + 5:
                data += sock.recv(65536)
        lines = data.split(b"\r\n", 1)[1].decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server for the duration of the block (a session's, a test's)."""
    server = RedisServer(directory).start()
    try:
        yield server
    finally:
        server.stop()


async def wait_for(predicate, timeout: float = 5.0, step: float = 0.02):
    with trio.fail_after(timeout):
        while not (result := await predicate()):
            await trio.sleep(step)
    return result
