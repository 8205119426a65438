"""A fleet's heartbeats, cheaply: N simulated eight-GPU hives, each on its own keep-alive
connection, posting a pre-encoded, gzip-compressed heartbeat every second (with jitter) over raw
non-blocking sockets and hand-written HTTP/1.1, reading back only the status line and the body's
length. The load generator of bench/test_bench_fleet.py, run as a process of its own so that what
it costs never lands on the queen's core:

    python -m tests.fleetload PORT [--plain | --channel] [--period-s S]

With ``--channel`` each hive speaks the queen's channel instead (a hand-written WebSocket upgrade,
then pre-encoded masked msgpack frames: its snapshot, then deltas of a few workers and all eight
GPUs each second, a snapshot every fifth beat), one frame answered before the next, as cheap to
generate as the POSTs.

One loop drives every hive (``Load``: one epoll set, one timer heap), so a beat costs this process
a send, a wake-up and a read: about 20 µs, where a trio task per hive cost about 170 µs and
saturated the load's core at ~6,000 hives, before the queen's (docs/scale.md).

It reads a number of hives per line on stdin: it grows the fleet to that many (new hives
connect gradually, ``RAMP_PER_S`` a second), lets it settle for ``--warmup-s``, prints
``start``, measures ``--window-s``, prints ``end``, then, once the window's beats are answered,
one line of JSON: what the window saw from the hives' side. The caller samples the queen between
``start`` and ``end``. End of stdin ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import gzip
import heapq
import itertools
import json
import os
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
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

    opening = b""
    """Sent once connected: nothing, a POST needs no handshake."""

    def __init__(self, request: bytes) -> None:
        self.request = request

    def opened(self, buffer: bytes) -> int | None:
        return 0

    def beat(self) -> bytes:
        return self.request

    def parse_answer(self, buffer: bytes) -> tuple[int, int] | None:
        """The status of the whole answer at the start of ``buffer`` and its size; None until
        it is whole. Only the status line and the length are parsed."""
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = 0
        for header in buffer[:end].lower().split(b"\r\n")[1:]:
            if header.startswith(b"content-length:"):
                length = int(header[15:])
        size = end + 4 + length
        if len(buffer) < size:
            return None
        return int(buffer[9:12]), size  # ValueError: not an HTTP answer

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
    reconnecting after the queen's ``retry_after_s`` and its full-jitter delay.

    The parsing is the caller's bytes in, answers out (``opened``, ``parse_answer``), so the
    load's one loop drives it; ``open`` and ``answer`` do the same on a trio socket."""

    def __init__(self, port: int, snapshot: bytes, deltas: list[bytes]) -> None:
        self.opening = (b"GET %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nupgrade: websocket\r\n"
                        b"connection: upgrade\r\nsec-websocket-version: 13\r\n"
                        b"sec-websocket-key: %s\r\n\r\n" % (CHANNEL.encode(), port, _KEY))
        self.frames = [snapshot, *deltas]
        self.next = 0
        """The frame sent next: the snapshot first on each connection and after a refusal
        (its seq is 0, the deltas' 1, 2, ...)."""
        self.retry_after_s: float | None = None
        """A busy queen's ``retry_after_s``, until the reconnect waits it out."""
        self._buffer = b""
        """What a trio socket brought after the last answer (``open``, ``answer``)."""

    def opened(self, buffer: bytes) -> int | None:
        """The size of the queen's 101 at the start of ``buffer``; None until it is whole."""
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        if buffer[9:12] != b"101":
            raise ConnectionLost
        self.next = 0
        return end + 4

    def beat(self) -> bytes:
        frame = self.frames[self.next]
        self.next = (self.next + 1) % len(self.frames)
        return frame

    def reconnect_wait(self, failed_rounds: int, rng: random.Random) -> float:
        """The real hive's full-jitter reconnect (``reconnect_delay``, default settings), after
        a busy queen's ``retry_after_s``: what a restarted queen facing the fleet sees."""
        retry_after_s, self.retry_after_s = self.retry_after_s, None
        return reconnect_delay(_HEARTBEAT, failed_rounds, retry_after_s, rng.random())

    def parse_answer(self, buffer: bytes) -> tuple[int, int] | None:
        """The queen's answer frame (unmasked) at the start of ``buffer`` and its size, None
        until it is whole: an ack is 200, anything else its status (a resync 409); ``Busy``
        for a refusal that ends the channel."""
        size = _frame_size(buffer)
        if size is None or len(buffer) < size:
            return None
        frame = buffer[:size]
        if b"\xa3ack" in frame[:16]:
            return 200, size
        if frame[0] & 0x0F != 0x2:  # a close (the queen stopping): not an answer
            raise ConnectionLost
        answer = decode_queen_frame(frame[2 if frame[1] < 126 else 4:])
        self.next = 0
        if type(answer) is ChannelResync:
            return 409, size
        if answer.status in (429, 503):
            self.retry_after_s = answer.retry_after_s
            raise Busy(answer.status)
        return answer.status, size

    async def open(self, sock: trio.socket.SocketType) -> None:
        """The upgrade on a connected trio socket."""
        await sock.send(self.opening)
        self._buffer = b""
        while (end := self.opened(self._buffer)) is None:
            self._buffer += await _received(sock)
        self._buffer = self._buffer[end:]

    async def answer(self, sock: trio.socket.SocketType) -> int:
        """The next answer's status, read from a trio socket."""
        while (parsed := self.parse_answer(self._buffer)) is None:
            self._buffer += await _received(sock)
        status, size = parsed
        self._buffer = self._buffer[size:]
        return status


async def _received(sock: trio.socket.SocketType) -> bytes:
    chunk = await sock.recv(RECV_SIZE)
    if not chunk:
        raise ConnectionLost
    return chunk


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


class ConnectionLost(Exception):
    pass


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


CLOSED, CONNECTING, OPENING, WAITING, ANSWERING = range(5)
"""A hive's connection: none (a reconnect is due), connecting, its handshake sent, between
beats, a beat sent and its answer awaited."""


class Hive:
    """One simulated hive: its connection, where it is, and when its next beat is due."""

    __slots__ = ("buffer", "counted", "due", "failed_rounds", "pending", "rng", "sock", "started",
                 "state", "talk", "timer", "window")

    def __init__(self, talk: Post | Channel, rng: random.Random, window: Window) -> None:
        self.talk, self.rng, self.window = talk, rng, window
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.pending = b""
        """What the kernel did not take of the last send yet."""
        self.state = CLOSED
        self.due = 0.0
        self.timer = 0
        """The token of this hive's one live timer (older ones are skipped)."""
        self.started = 0.0
        """When the current step began: the beat's send, or the connect."""
        self.counted = False
        """The beat in flight counts in ``window``."""
        self.failed_rounds = 0


class Load:
    """Every hive's socket in one epoll set and every beat on one timer heap, driven by one
    loop: a beat costs a send, a wake-up and a read, with no task, coroutine or scheduler per
    hive (a trio task per hive cost this process about 170 µs a beat, so at ~6,000 hives its
    own lag, not the queen's, set the latencies it measured)."""

    def __init__(self, port: int, meter: Meter) -> None:
        self.port, self.meter = port, meter
        self.epoll = select.epoll()
        self.by_fd: dict[int, Hive] = {}
        self.hives: list[Hive] = []
        self.timers: list[tuple[float, int, Hive]] = []
        self.tokens = itertools.count(1)
        self.target = 0
        """Hives asked for; the loop connects new ones, ``RAMP_PER_S`` a second."""
        self.done = False

    def schedule(self, hive: Hive, when: float) -> None:
        hive.timer = token = next(self.tokens)
        heapq.heappush(self.timers, (when, token, hive))

    def run(self, make: Callable[[int], Post | Channel], seed: random.Random) -> None:
        """Beat until ``done``; new hives made by ``make(n)`` as ``target`` grows."""
        timers, epoll, by_fd, clock = self.timers, self.epoll, self.by_fd, time.perf_counter
        ramped_at = clock()
        sweep_at = ramped_at
        while not self.done:
            now = clock()
            if len(self.hives) < self.target:
                allowed = int((now - ramped_at) * RAMP_PER_S)
                if allowed:
                    ramped_at += allowed / RAMP_PER_S
                    for _ in range(min(allowed, self.target - len(self.hives))):
                        hive = Hive(make(len(self.hives)), random.Random(seed.random()),
                                    self.meter.window)
                        self.hives.append(hive)
                        self.schedule(hive, now)
                        hive.due = now + hive.rng.uniform(0, self.meter.period_s)
            else:
                ramped_at = now
            while timers and timers[0][0] <= now:
                _, token, hive = heapq.heappop(timers)
                if token == hive.timer:
                    self.step(hive, now)
            if now >= sweep_at:
                sweep_at = now + 0.25
                self.expire(now)
            wait = min(timers[0][0] - now if timers else 0.05, 0.05)
            for fd, events in epoll.poll(max(wait, 0.0), 4096):
                hive = by_fd.get(fd)
                if hive is not None:
                    self.ready(hive, events)
        for hive in self.hives:
            self.close(hive)
        epoll.close()

    def step(self, hive: Hive, now: float) -> None:
        """A hive's timer: its beat is due, or its reconnect."""
        if hive.state == WAITING:
            self.send_beat(hive, now)
        elif hive.state == CLOSED:
            self.connect(hive, now)

    def connect(self, hive: Hive, now: float) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        hive.sock, hive.state, hive.started, hive.buffer, hive.pending = (
            sock, CONNECTING, now, b"", b"")
        hive.window = self.meter.window
        self.by_fd[sock.fileno()] = hive
        error = sock.connect_ex(("127.0.0.1", self.port))
        if error not in (0, errno.EINPROGRESS):
            self.lost(hive, timeout=False)
            return
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def send_beat(self, hive: Hive, now: float) -> None:
        window = hive.window = self.meter.window
        hive.counted = counted = window.open
        window.sent += counted
        window.in_flight += counted
        hive.state = ANSWERING
        hive.started = time.perf_counter()
        self.send(hive, hive.talk.beat())

    def send(self, hive: Hive, data: bytes) -> None:
        """Send, keeping what the kernel does not take yet for when the socket is writable."""
        try:
            sent = hive.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.lost(hive, timeout=False)
            return
        hive.pending = data[sent:]
        if hive.pending:
            self.epoll.modify(hive.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def ready(self, hive: Hive, events: int) -> None:
        sock = hive.sock
        if hive.state == CONNECTING:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.lost(hive, timeout=False)
                return
            self.epoll.modify(sock.fileno(), select.EPOLLIN)
            hive.state = OPENING
            if hive.talk.opening:
                self.send(hive, hive.talk.opening)
            else:
                self.answered(hive, b"")
            return
        if events & select.EPOLLOUT and hive.pending:
            data, hive.pending = hive.pending, b""
            self.epoll.modify(sock.fileno(), select.EPOLLIN)
            self.send(hive, data)
            if hive.sock is None:
                return
        if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.lost(hive, timeout=False)
                return
            self.answered(hive, hive.buffer + data if hive.buffer else data)

    def answered(self, hive: Hive, buffer: bytes) -> None:
        """Bytes from the queen: the handshake's answer, or the beat's."""
        talk = hive.talk
        try:
            if hive.state == OPENING:
                end = talk.opened(buffer)
                if end is None:
                    hive.buffer = buffer
                    return
                hive.buffer, hive.state, hive.failed_rounds = buffer[end:], WAITING, 0
                self.schedule(hive, hive.due)
                return
            if hive.state != ANSWERING:
                hive.buffer = buffer  # nothing is asked: kept for the next answer
                return
            parsed = talk.parse_answer(buffer)
        except Busy as busy:
            self.count(hive, busy.status)
            self.close(hive)
            self.retry(hive)
            return
        except (ConnectionLost, ValueError):
            self.lost(hive, timeout=False)
            return
        if parsed is None:
            hive.buffer = buffer
            return
        status, size = parsed
        hive.buffer = buffer[size:]
        self.count(hive, status)
        hive.state = WAITING
        now = time.perf_counter()
        period = self.meter.period_s
        hive.due += period + hive.rng.uniform(-JITTER_S, JITTER_S)
        if hive.due < now - period:  # fell a whole beat behind: send the next one now
            hive.due = now
        self.schedule(hive, hive.due)

    def count(self, hive: Hive, status: int) -> None:
        if hive.counted:
            window = hive.window
            window.latencies.append(time.perf_counter() - hive.started)
            window.statuses[status] = window.statuses.get(status, 0) + 1
            window.in_flight -= 1
            hive.counted = False

    def expire(self, now: float) -> None:
        """Beats unanswered for ``ANSWER_TIMEOUT_S`` (and connections not open by then)."""
        for hive in self.hives:
            if hive.state in (ANSWERING, CONNECTING, OPENING) and \
                    now - hive.started > ANSWER_TIMEOUT_S:
                self.lost(hive, timeout=hive.state == ANSWERING)

    def lost(self, hive: Hive, *, timeout: bool) -> None:
        """A reset, a close or no answer in time: counted, and the hive reconnects."""
        window = hive.window
        if timeout:
            window.timeouts += hive.counted or window.open
        else:
            window.resets += hive.counted or window.open
        window.in_flight -= hive.counted
        hive.counted = False
        self.close(hive)
        self.retry(hive)

    def retry(self, hive: Hive) -> None:
        wait = hive.talk.reconnect_wait(hive.failed_rounds, hive.rng)
        hive.failed_rounds += 1
        hive.due = time.perf_counter() + wait
        self.schedule(hive, hive.due)

    def close(self, hive: Hive) -> None:
        sock, hive.sock, hive.state = hive.sock, None, CLOSED
        if sock is not None:
            fd = sock.fileno()
            self.by_fd.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
            sock.close()


@dataclass
class Meter:
    """The window now open (or last closed): each beat is counted in the one open when it was sent."""

    window: Window = field(default_factory=Window)
    period_s: float = PERIOD_S
    """Each hive's beat (``--period-s``): 1 s as a hive sends; longer to hold a fleet bigger
    than the queen's core carries at 1 Hz (its memory, its restart)."""


def steer(load: Load, *, warmup_s: float, window_s: float) -> None:
    """The steps, read from stdin (in a thread of their own, the loop beating meanwhile): grow
    the fleet, let it settle, open a window, print what it saw."""
    meter = load.meter
    try:
        while line := sys.stdin.readline():
            target = int(line)
            raise_descriptor_limit(target + 256)
            load.target = target
            while len(load.hives) < target:
                time.sleep(0.05)
            # what the hives hold, out of this process's collections: at thousands of hives a
            # full one walked them for 100 ms and more, between sends and answers it was timing
            gc.collect()
            gc.freeze()
            time.sleep(warmup_s)
            meter.window = window = Window(open=True)
            print("start", flush=True)
            before = os.times()
            time.sleep(window_s)
            window.open = False
            spent = os.times()
            print("end", flush=True)
            cpu_s = (spent.user + spent.system) - (before.user + before.system)
            deadline = time.monotonic() + ANSWER_TIMEOUT_S + 1  # the window's beats in flight
            while window.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            print(json.dumps(window.summary(target, window_s, cpu_s, meter.period_s)),
                  flush=True)
    finally:
        load.done = True


def run(port: int, *, compressed: bool, channel: bool, warmup_s: float,
        window_s: float, prefix: str = "fleet-hive", period_s: float = PERIOD_S) -> None:
    rng = random.Random(24)
    deltas = channel_deltas() if channel else []

    def make(n: int) -> Post | Channel:
        hive_id = f"{prefix}-{n:05d}"
        if channel:
            snapshot = FrameMaker().frame(eight_gpu_hive(hive_id, n), True)
            return Channel(port, masked(snapshot), deltas)
        body = eight_gpu_heartbeat(hive_id, n)
        if compressed:
            body = gzip.compress(body, compresslevel=1, mtime=0)
        return Post(post(port, body, compressed=compressed))

    load = Load(port, Meter(period_s=period_s))
    steering = threading.Thread(target=steer, args=(load,), daemon=True,
                                kwargs={"warmup_s": warmup_s, "window_s": window_s})
    steering.start()
    load.run(make, rng)


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
    run(args.port, compressed=not args.plain, channel=args.channel, warmup_s=args.warmup_s,
        window_s=args.window_s, prefix=args.prefix, period_s=args.period_s)


if __name__ == "__main__":
    main()
