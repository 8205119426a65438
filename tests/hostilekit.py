"""Hostile connections, by the hundred, as an attacker on the same network would open them: raw
TCP sockets (trio) that send a chosen beginning, then a trickle, and record when the server
closes on them; and a real hive's heartbeats watched while they are open. Shared by
tests/test_hardening.py (a few hundred) and bench/test_bench_hostile.py (a thousand and more)."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import httpx
import trio

REPLY_KEPT = 1000
"""Bytes of each answer kept (status line, headers, the start of the JSON)."""
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


def slow_headers() -> bytes:
    return b"POST /v1/hive-heartbeat HTTP/1.1\r\nhost: queen\r\nx-slow: "


def slow_body(length: int) -> bytes:
    return (b"POST /v1/hive-heartbeat HTTP/1.1\r\nhost: queen\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n{" % length)


@dataclass
class Hostile:
    """What the server did to a batch of hostile connections."""

    opened: int = 0
    refused: int = 0
    """Connections the server would not even accept (connect failed)."""
    closed_after: list[float] = field(default_factory=list)
    """For each connection the server closed, seconds from its connect to the close."""
    replies: list[bytes] = field(default_factory=list)
    """The first ``REPLY_KEPT`` bytes the server answered on each connection that got an answer,
    or b"" for one closed without an answer."""

    def status_codes(self) -> list[int]:
        return [int(reply.split(b" ", 2)[1]) for reply in self.replies
                if reply.startswith(b"HTTP/1.1 ")]


def raise_descriptor_limit(needed: int) -> None:
    """This test process holds both ends' client side: its soft RLIMIT_NOFILE must fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def open_hostile(nursery: trio.Nursery, port: int, count: int, *, first: bytes = b"",
                       payload: int = 0, trickle: bytes = b"", every_s: float = 1.0) -> Hostile:
    """Open ``count`` connections to 127.0.0.1:``port``; each sends ``first``, then ``payload``
    bytes of filler, then ``trickle`` every ``every_s`` (nothing if empty), until the server
    closes it or the nursery is cancelled. Returns once every connection is attempted."""
    hostile = Hostile()
    for _ in range(count):
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError:
            hostile.refused += 1
            sock.close()
            continue
        hostile.opened += 1
        nursery.start_soon(_hold, sock, hostile, first, payload, trickle, every_s)
    return hostile


async def _hold(sock: trio.socket.SocketType, hostile: Hostile, first: bytes, payload: int,
                trickle: bytes, every_s: float) -> None:
    opened_at = trio.current_time()
    with sock:
        async with trio.open_nursery() as both:
            async def read_until_closed() -> None:
                answer = None  # its index in hostile.replies, from the first byte on
                try:
                    while data := await sock.recv(4096):
                        if answer is None:
                            answer = len(hostile.replies)
                            hostile.replies.append(b"")
                        if len(hostile.replies[answer]) < REPLY_KEPT:
                            hostile.replies[answer] += data[:REPLY_KEPT]
                except OSError:
                    pass
                hostile.closed_after.append(trio.current_time() - opened_at)
                if answer is None:
                    hostile.replies.append(b"")
                both.cancel_scope.cancel()

            async def write() -> None:
                try:
                    if first:
                        await sock.send(first)
                    filler = b"x" * 65536
                    left = payload
                    while left > 0:
                        left -= await sock.send(filler[:left])
                    while trickle:
                        await trio.sleep(every_s)
                        await sock.send(trickle)
                except OSError:
                    pass  # the server closed: the reader sees it

            both.start_soon(read_until_closed)
            both.start_soon(write)


@dataclass
class Deliveries:
    count: int
    longest_gap_s: float


async def watch_deliveries(sender, seconds: float) -> Deliveries:
    """How many heartbeats a real hive's sender delivered over ``seconds``, and the longest time
    it went without delivering one."""
    started = last_change = trio.current_time()
    first = last = sender.state.delivered
    gap = 0.0
    while (now := trio.current_time()) - started < seconds:
        await trio.sleep(0.02)
        if sender.state.delivered != last:
            now = trio.current_time()
            gap, last_change, last = max(gap, now - last_change), now, sender.state.delivered
    return Deliveries(last - first, max(gap, trio.current_time() - last_change))


async def health_latencies(url: str, seconds: float, every_s: float = 0.05,
                           verify: object = True) -> list[float]:
    """``GET /health`` on a new connection each time, for ``seconds``: each one's latency."""
    latencies = []
    started = trio.current_time()
    while trio.current_time() - started < seconds:
        async with httpx.AsyncClient(timeout=10.0, verify=verify) as client:
            before = trio.current_time()
            response = await client.get(f"{url}/health")
            latencies.append(trio.current_time() - before)
            assert response.status_code == 200, response.text
        await trio.sleep(every_s)
    return latencies


KINDS = {
    "slow-headers": {"first": slow_headers(), "trickle": b"a", "every_s": 2.0},
    "slow-body": {"first": slow_body(4 * 2**20), "trickle": b" ", "every_s": 2.0},
    "idle": {},
    "big-bodies": {"first": slow_body(4 * 2**20 - 1), "payload": 512 * 2**10},
    "h2c": {"first": HTTP2_PREFACE + HTTP2_SETTINGS},
}
"""The bench's kinds of hostile connection (bench/test_bench_hostile.py)."""


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.hostilekit KIND PORT COUNT SECONDS``: hold ``COUNT`` hostile connections
    of ``KIND`` for ``SECONDS`` from a process of their own (so the one measuring is not slowed
    by them), then print what the server did, as JSON."""
    import json
    import sys

    kind, port, count, seconds = (argv or sys.argv[1:])
    raise_descriptor_limit(int(count) + 256)

    async def attack() -> Hostile:
        async with trio.open_nursery() as nursery:
            hostile = await open_hostile(nursery, int(port), int(count), **KINDS[kind])
            print("opened", flush=True)
            await trio.sleep(float(seconds))
            nursery.cancel_scope.cancel()
        return hostile

    hostile = trio.run(attack)
    print(json.dumps({"opened": hostile.opened, "refused": hostile.refused,
                      "closed": len(hostile.closed_after),
                      "closed_after_max_s": max(hostile.closed_after, default=0.0),
                      "status_503": hostile.status_codes().count(503)}), flush=True)


if __name__ == "__main__":
    main()
