"""Stand-in vLLM engines for the engine benchmarks: ``count`` endpoints served by one separate
process (asyncio, keep-alive HTTP/1.1), so the poller's CPU is measured alone.

Each endpoint serves vLLM 0.10's exposition (tests/engine_fixtures) on ``/metrics`` and
``{"server_load": N}`` on ``/load``, N the requests in flight. The two agree, as a real vLLM's
do: ``/metrics`` says ``min(N, 12)`` running and the rest waiting (19 in flight at start: the
fixture's 12 and 7). The benchmark sets N through the process's stdin (``set_load``).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.engineservers import fixture

SERVER = r'''
import asyncio, json, re, sys
metrics = open(sys.argv[2], "rb").read()
loads = {}
FIGURES = re.compile(rb"^(vllm:num_requests_(running|waiting)\{[^}]*\}) \S+$", re.M)

def answer(body, kind):
    return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (kind, len(body), body))

def exposition(load):
    running = min(load, 12)
    figure = {b"running": running, b"waiting": load - running}
    body = FIGURES.sub(lambda m: b"%s %d.0" % (m.group(1), figure[m.group(2)]), metrics)
    return answer(body, b"text/plain; version=0.0.4; charset=utf-8")

async def serve(reader, writer, index):
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            load = loads.get(index, 19)
            if request.startswith(b"GET /load "):
                writer.write(answer(json.dumps({"server_load": load}).encode(),
                                    b"application/json"))
            else:
                writer.write(exposition(load))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def control():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        index, load = map(int, line.split())
        loads[index] = load

async def main():
    servers = []
    for index in range(int(sys.argv[1])):
        handler = lambda r, w, index=index: serve(r, w, index)
        servers.append(await asyncio.start_server(handler, "127.0.0.1", 0))
    print(json.dumps([s.sockets[0].getsockname()[1] for s in servers]), flush=True)
    await control()

asyncio.run(main())
'''


class Engines:
    """``count`` engine endpoints in one separate process; ``set_load`` changes one's load."""

    def __init__(self, count: int, directory) -> None:
        path = directory / "vllm.prom"
        path.write_text(fixture("vllm-0.10.0.prom"))
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(count), str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.urls = [f"http://127.0.0.1:{port}/metrics"
                     for port in json.loads(self.process.stdout.readline())]

    def set_load(self, index: int, load: int) -> None:
        self.process.stdin.write(f"{index} {load}\n")
        self.process.stdin.flush()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
