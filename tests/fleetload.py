"""A fleet's heartbeats, cheaply: N simulated eight-GPU hives, each on its own keep-alive
connection, posting a pre-encoded, gzip-compressed heartbeat every second (with jitter) over raw
trio sockets and hand-written HTTP/1.1, reading back only the status line and the body's length.
The load generator of bench/test_bench_fleet.py, run as a process of its own so that what it
costs never lands on the queen's core:

    python -m tests.fleetload PORT [--plain | --channel] [--period-s S]

With ``--channel`` each hive speaks the queen's channel instead (a hand-written WebSocket upgrade,
then pre-encoded masked msgpack frames: its snapshot, then deltas of a few workers and all eight
GPUs each second, a snapshot every fifth beat), one frame answered before the next, as cheap to
generate as the POSTs.

It reads a number of hives per line on stdin: it grows the fleet to that many (new hives
connect gradually, ``RAMP_PER_S`` a second), lets it settle for ``--warmup-s``, prints
``start``, measures ``--window-s``, prints ``end``, then, once the window's beats are answered,
one line of JSON: what the window saw from the hives' side. The caller samples the queen between
``start`` and ``end``. End of stdin ends the run.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import trio

from rbee.config import HeartbeatSettings
from rbee.contract import (
    ChannelResync,
    EngineState,
    GpuUtilSource,
    HiveHeartbeat,
    WorkerGpuUse,
    decode_queen_frame,
    encode,
)
from rbee.contract.paths import CHANNEL, HEARTBEAT
from rbee.hive.channel import FrameMaker
from rbee.hive.heartbeat import reconnect_delay
from tests.builders import fleet_heartbeat
from tests.hostilekit import raise_descriptor_limit

GPUS = 8
PERIOD_S = 1.0
JITTER_S = 0.05
"""Each beat is due ``PERIOD_S`` after the last one was due, give or take this (uniform)."""
RAMP_PER_S = 500
"""New hives connecting per second while the fleet grows."""
ANSWER_TIMEOUT_S = 10.0
RECONNECT_S = 1.0
RECV_SIZE = 65536


def eight_gpu_heartbeat(hive_id: str, seed: int) -> bytes:
    """An eight-GPU hive of eight vLLM workers as a real hive reports it: each worker's use of
    its GPU and its engine's state, each GPU's temperature and power. JSON, not yet compressed."""
    return encode(eight_gpu_hive(hive_id, seed))


def eight_gpu_hive(hive_id: str, seed: int) -> HiveHeartbeat:
    """The heartbeat of ``eight_gpu_heartbeat``, as the struct."""
    rng = random.Random(seed)
    heartbeat = fleet_heartbeat(hive_id, GPUS)
    for device in heartbeat.capabilities:
        device.util_pct = round(rng.uniform(30, 99), 1)
        device.mem_util_pct = round(rng.uniform(10, 60), 1)
        device.temperature_c = float(rng.randint(40, 80))
        device.power_w = round(rng.uniform(150, 690), 1)
    for index, worker in enumerate(heartbeat.workers):
        util = round(rng.uniform(30, 99), 1)
        worker.gpu_util_pct = util
        worker.cpu_pct = round(rng.uniform(80, 120), 2)
        worker.gpu_util_source = GpuUtilSource.PROCESS
        worker.gpus = [WorkerGpuUse(
            index=index, uuid=f"GPU-{index:08d}", vram_mb=float(worker.vram_mb), util_pct=util,
            mem_util_pct=round(rng.uniform(10, 60), 1), util_source=GpuUtilSource.PROCESS,
            util_window_s=1.0)]
        worker.engine = EngineState(
            engine="vllm", version="0.6.3", requests_running=rng.randint(0, 64),
            requests_waiting=rng.randint(0, 16), kv_cache_pct=round(rng.uniform(0, 100), 1),
            prompt_tokens_s=round(rng.uniform(0, 20000), 1),
            generation_tokens_s=round(rng.uniform(0, 4000), 1),
            ttft_p50_s=round(rng.uniform(0.02, 0.3), 4), ttft_p95_s=round(rng.uniform(0.3, 2), 4),
            preemptions_s=0.0, rate_window_s=1.0)
    return heartbeat


def post(port: int, body: bytes, *, compressed: bool) -> bytes:
    """The whole request, as httpx sends a hive's heartbeat (headers and all)."""
    encoding = b"content-encoding: gzip\r\n" if compressed else b""
    return (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\naccept: */*\r\n"
            b"accept-encoding: gzip, deflate\r\nconnection: keep-alive\r\n"
            b"user-agent: rbee-hive/fleetload\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\n\r\n" % (HEARTBEAT.encode(), port, encoding, len(body))
            + body)


class Post:
    """A hive that POSTs its whole heartbeat every beat."""

    def __init__(self, request: bytes) -> None:
        self.request = request

    async def open(self, sock: trio.socket.SocketType) -> None:
        pass

    def beat(self) -> bytes:
        return self.request

    async def answer(self, sock: trio.socket.SocketType) -> int:
        return await answer_status(sock)

    def reconnect_wait(self, failed_rounds: int, rng: random.Random) -> float:
        return RECONNECT_S


SNAPSHOT_EVERY = 5
"""On the channel, a snapshot every fifth beat (``heartbeat.snapshot_every_s`` at 1 Hz)."""
CHANGED_WORKERS = 3
_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_HEARTBEAT = HeartbeatSettings()


def masked(payload: bytes, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    """One binary WebSocket frame as a client must send it (masked, RFC 6455 5.3)."""
    n = len(payload)
    length = (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
              if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
    keys = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return b"\x82" + length + mask + body


def channel_deltas() -> list[bytes]:
    """The deltas every channel hive sends between its snapshots (shared: a delta names no
    hive): each beat ``CHANGED_WORKERS`` workers' figures and all eight GPUs' move."""
    maker = FrameMaker()
    beats = [eight_gpu_hive("fleet-hive-00000", 0)]
    for n in range(1, SNAPSHOT_EVERY):
        fresh = eight_gpu_hive("fleet-hive-00000", n)
        workers = list(beats[0].workers)
        for i in range(CHANGED_WORKERS):
            index = (n * CHANGED_WORKERS + i) % GPUS
            workers[index] = fresh.workers[index]
        beats.append(HiveHeartbeat(hive=beats[0].hive, timestamp=fresh.timestamp,
                                   workers=workers, capabilities=fresh.capabilities))
    frames = [maker.frame(beat, snapshot=n == 0) for n, beat in enumerate(beats)]
    return [masked(frame) for frame in frames[1:]]


class Channel:
    """A hive on its channel: a hand-written WebSocket upgrade, then pre-encoded masked frames:
    its snapshot, then the shared deltas, a snapshot again every ``SNAPSHOT_EVERY`` beats. As
    the real hive does (``rbee/hive/channel.py``): a frame refused for any other reason is
    followed by the snapshot, and a busy queen's refusal (429/503) ends the channel, the hive
    reconnecting after the queen's ``retry_after_s`` and its full-jitter delay."""

    def __init__(self, port: int, snapshot: bytes, deltas: list[bytes]) -> None:
        self.upgrade = (b"GET %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nupgrade: websocket\r\n"
                        b"connection: upgrade\r\nsec-websocket-version: 13\r\n"
                        b"sec-websocket-key: %s\r\n\r\n" % (CHANNEL.encode(), port, _KEY))
        self.frames = [snapshot, *deltas]
        self.next = 0
        """The frame sent next: the snapshot first on each connection and after a refusal
        (its seq is 0, the deltas' 1, 2, ...)."""
        self.buffer = b""
        self.retry_after_s: float | None = None
        """A busy queen's ``retry_after_s``, until the reconnect waits it out."""

    async def open(self, sock: trio.socket.SocketType) -> None:
        await sock.send(self.upgrade)
        data, end = await head(sock)
        if data[9:12] != b"101":
            raise ConnectionLost
        self.buffer = data[end + 4:]
        self.next = 0

    def beat(self) -> bytes:
        frame = self.frames[self.next]
        self.next = (self.next + 1) % len(self.frames)
        return frame

    def reconnect_wait(self, failed_rounds: int, rng: random.Random) -> float:
        """The real hive's full-jitter reconnect (``reconnect_delay``, default settings), after
        a busy queen's ``retry_after_s``: what a restarted queen facing the fleet sees."""
        retry_after_s, self.retry_after_s = self.retry_after_s, None
        return reconnect_delay(_HEARTBEAT, failed_rounds, retry_after_s, rng.random())

    async def answer(self, sock: trio.socket.SocketType) -> int:
        """The queen's answer frame (unmasked): an ack is 200, anything else its status (a
        resync 409); ``Busy`` once the answer is counted, for a refusal that ends the channel."""
        while (size := _frame_size(self.buffer)) is None or len(self.buffer) < size:
            chunk = await sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionLost
            self.buffer += chunk
        frame, self.buffer = self.buffer[:size], self.buffer[size:]
        if b"\xa3ack" in frame[:16]:
            return 200
        if frame[0] & 0x0F != 0x2:  # a close (the queen stopping): not an answer
            raise ConnectionLost
        answer = decode_queen_frame(frame[2 if frame[1] < 126 else 4:])
        self.next = 0
        if type(answer) is ChannelResync:
            return 409
        if answer.status in (429, 503):
            self.retry_after_s = answer.retry_after_s
            raise Busy(answer.status)
        return answer.status


def _frame_size(buffer: bytes) -> int | None:
    """The whole size of the server frame at the start of ``buffer`` (unmasked, under 64 KiB),
    or None until its length is there."""
    if len(buffer) < 2:
        return None
    length = buffer[1] & 0x7F
    if length < 126:
        return 2 + length
    return None if len(buffer) < 4 else 4 + int.from_bytes(buffer[2:4], "big")


class Busy(Exception):
    """The queen refused a frame as busy: the hive leaves the channel and reconnects later."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Window:
    """What the hives saw while it was open: beats sent, answers by status, broken connections,
    and each answer's latency (from just before the send to the last byte of the answer)."""

    open: bool = False
    sent: int = 0
    in_flight: int = 0
    """Beats sent while it was open and not answered yet."""
    statuses: dict[int, int] = field(default_factory=dict)
    resets: int = 0
    timeouts: int = 0
    latencies: list[float] = field(default_factory=list)

    def summary(self, hives: int, seconds: float, cpu_s: float, period_s: float) -> dict:
        latencies = sorted(self.latencies) or [float("nan")]
        return {"hives": hives, "window_s": seconds, "period_s": period_s,
                "expected": round(hives * seconds / period_s),
                "sent": self.sent, "answered": len(self.latencies), "unanswered": self.in_flight,
                "ok": self.statuses.get(200, 0),
                "statuses": {str(code): n for code, n in sorted(self.statuses.items())},
                "resets": self.resets, "timeouts": self.timeouts,
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
                "max_ms": latencies[-1] * 1e3, "load_cpu_pct": cpu_s / seconds * 100}


@dataclass
class Meter:
    """The window now open (or last closed): each beat is counted in the one open when it was sent."""

    window: Window = field(default_factory=Window)
    period_s: float = PERIOD_S
    """Each hive's beat (``--period-s``): 1 s as a hive sends; longer to hold a fleet bigger
    than the queen's core carries at 1 Hz (its memory, its restart)."""


class ConnectionLost(Exception):
    pass


async def head(sock: trio.socket.SocketType) -> tuple[bytes, int]:
    """An answer's head and what came after it, and where the head ends."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        chunk = await sock.recv(RECV_SIZE)
        if not chunk:
            raise ConnectionLost
        data += chunk
    return data, end


async def answer_status(sock: trio.socket.SocketType) -> int:
    """Read one whole answer; its status code. Only the status line and the length are parsed."""
    data, end = await head(sock)
    length = 0
    for header in data[:end].lower().split(b"\r\n")[1:]:
        if header.startswith(b"content-length:"):
            length = int(header[15:])
    left = end + 4 + length - len(data)
    while left > 0:
        chunk = await sock.recv(max(left, RECV_SIZE))
        if not chunk:
            raise ConnectionLost
        left -= len(chunk)
    return int(data[9:12])


async def hive(port: int, talk: Post | Channel, meter: Meter, rng: random.Random) -> None:
    """One hive: connect, then a beat every ``meter.period_s`` (jittered) on the same
    connection, one at a time as a real hive's sender does; a broken connection is counted and
    opened again."""
    period = meter.period_s
    due = trio.current_time() + rng.uniform(0, period)
    failed_rounds = 0
    while True:
        sock = trio.socket.socket()
        window, counted = meter.window, False
        try:
            await sock.connect(("127.0.0.1", port))
            await talk.open(sock)
            failed_rounds = 0
            while True:
                request = talk.beat()
                await trio.sleep_until(due)
                window = meter.window
                counted = window.open
                window.sent += counted
                window.in_flight += counted
                started = time.perf_counter()
                sent = 0
                while sent < len(request):
                    sent += await sock.send(request[sent:])
                with trio.fail_after(ANSWER_TIMEOUT_S):
                    try:
                        status = await talk.answer(sock)
                    except Busy as busy:
                        status, leave = busy.status, True
                    else:
                        leave = False
                if counted:
                    window.latencies.append(time.perf_counter() - started)
                    window.statuses[status] = window.statuses.get(status, 0) + 1
                    window.in_flight -= 1
                    counted = False
                if leave:
                    break
                now = trio.current_time()
                due += period + rng.uniform(-JITTER_S, JITTER_S)
                if due < now - period:  # fell a whole beat behind: send the next one now
                    due = now
        except trio.TooSlowError:
            window.timeouts += counted or window.open
        except (OSError, ConnectionLost, ValueError):  # reset, closed, or not an HTTP answer
            window.resets += counted or window.open
        finally:
            window.in_flight -= counted
            sock.close()
        await trio.sleep(talk.reconnect_wait(failed_rounds, rng))
        failed_rounds += 1
        due = trio.current_time()


async def run(port: int, *, compressed: bool, channel: bool, warmup_s: float,
              window_s: float, prefix: str = "fleet-hive", period_s: float = PERIOD_S) -> None:
    rng = random.Random(24)
    deltas = channel_deltas() if channel else []
    meter = Meter(period_s=period_s)
    started = 0
    async with trio.open_nursery() as nursery:
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            target = int(line)
            raise_descriptor_limit(target + 256)
            while started < target:
                hive_id = f"{prefix}-{started:05d}"
                if channel:
                    snapshot = FrameMaker().frame(eight_gpu_hive(hive_id, started), True)
                    talk: Post | Channel = Channel(port, masked(snapshot), deltas)
                else:
                    body = eight_gpu_heartbeat(hive_id, started)
                    if compressed:
                        body = gzip.compress(body, compresslevel=1, mtime=0)
                    talk = Post(post(port, body, compressed=compressed))
                nursery.start_soon(hive, port, talk, meter, random.Random(rng.random()))
                started += 1
                await trio.sleep(1 / RAMP_PER_S)
            # what the hives hold, out of this process's collections: at thousands of hives a
            # full one walked them for 100 ms and more, between sends and answers it was timing
            gc.collect()
            gc.freeze()
            await trio.sleep(warmup_s)
            meter.window = window = Window(open=True)
            print("start", flush=True)
            before = os.times()
            await trio.sleep(window_s)
            window.open = False
            spent = os.times()
            print("end", flush=True)
            cpu_s = (spent.user + spent.system) - (before.user + before.system)
            with trio.move_on_after(ANSWER_TIMEOUT_S + 1):  # the window's beats still in flight
                while window.in_flight:
                    await trio.sleep(0.05)
            print(json.dumps(window.summary(target, window_s, cpu_s, period_s)), flush=True)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fleetload", description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--plain", action="store_true", help="send JSON uncompressed")
    parser.add_argument("--channel", action="store_true",
                        help="each hive on its channel (WebSocket, msgpack deltas), not POST")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--period-s", type=float, default=PERIOD_S,
                        help="each hive's beat (default 1 s)")
    parser.add_argument("--prefix", default="fleet-hive",
                        help="hive ids: PREFIX-00000 and on (one per load process of one fleet)")
    args = parser.parse_args(argv)
    trio.run(lambda: run(args.port, compressed=not args.plain, channel=args.channel,
                         warmup_s=args.warmup_s, window_s=args.window_s, prefix=args.prefix,
                         period_s=args.period_s))


if __name__ == "__main__":
    main()
