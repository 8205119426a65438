"""A small stand-in for an LLM inference worker: ``python -m rbee.demo.worker --model NAME``.

It does light work that changes over time (CPU bursts, a growing and shrinking buffer, file writes
and reads) so that every metric of the pipeline moves. With ``--metrics-port N`` it also runs a
simulated vLLM engine (``rbee.demo.engine``) whose load follows the same wave, published in vLLM's
format on 127.0.0.1:N, so the engine columns move too; the same port answers OpenAI-style
completions that join the engine's queue, and vLLM's ``GET /load`` with
``--enable-server-load-tracking`` (``rbee.demo.serving``). It exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import tempfile
import time

from .engine import SimulatedEngine
from .serving import EngineServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--load", type=float, default=0.3, help="peak share of one core, 0..1")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve a simulated vLLM engine (metrics, completions) on this port")
    parser.add_argument("--arrival-rate", type=float, default=6.0,
                        help="peak simulated requests a second (0: only the real ones)")
    parser.add_argument("--enable-server-load-tracking", action="store_true",
                        help="count requests in flight for GET /load, as vLLM's flag does")
    args = parser.parse_args(argv)
    engine = server = None
    if args.metrics_port is not None:
        engine = SimulatedEngine(args.model)
        server = EngineServer(engine, args.metrics_port,
                              load_tracking=args.enable_server_load_tracking).start()
    running = True

    def stop(_signo, _frame):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    buffer = bytearray()
    fd, path = tempfile.mkstemp(prefix=f"rbee-demo-{args.model.replace('/', '_')}-")  # org/model
    os.unlink(path)
    started = last = time.monotonic()
    try:
        while running:
            now = time.monotonic()
            phase = (now - started) / 7.0
            load = args.load * (0.55 + 0.45 * math.sin(phase))
            if engine is not None:  # busy waves: from idle to queueing and back
                engine.step(now, now - last,
                            arrivals_per_s=max(0.0, args.arrival_rate * math.sin(phase)))
            last = now
            busy_until = time.monotonic() + 0.1 * load
            while time.monotonic() < busy_until:
                sum(i * i for i in range(2000))
            target = int((24 + 16 * math.sin(phase / 2)) * 2**20)
            buffer = buffer[:target] if len(buffer) > target else buffer + bytearray(
                min(2**20, target - len(buffer)))
            os.pwrite(fd, os.urandom(16384), int(phase * 1000) % 64 * 16384)
            os.fsync(fd)
            os.pread(fd, 16384, 0)
            time.sleep(max(0.0, 0.1 - 0.1 * load))
    finally:
        os.close(fd)
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
