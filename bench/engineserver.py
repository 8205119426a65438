"""Stand-in vLLM engines for the engine benchmarks: ``count`` endpoints served by one separate
process (asyncio, keep-alive HTTP/1.1), so the poller's CPU is measured alone.

Each endpoint serves vLLM 0.10's exposition (tests/engine_fixtures) on ``/metrics`` and
``{"server_load": N}`` on ``/load``, N the requests in flight. The two agree, as a real vLLM's
do: ``/metrics`` says ``min(N, 12)`` running and the rest waiting (19 in flight at start: the
fixture's 12 and 7). The benchmark sets N through the process's stdin (``set_load``); the
process notes when it applied each, so a benchmark can tell its own delay from the poll's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.engineservers import fixture

SERVER = r'''
import asyncio, json, re, sys, time
metrics = open(sys.argv[2], "rb").read()
loads = {}
applied = []
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
            print(json.dumps(applied), flush=True)
            return
        index, load = map(int, line.split())
        loads[index] = load
        applied.append((index, load, time.time()))

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
    """``count`` engine endpoints in processes of at most ``per_process`` each (one asyncio loop
    answering 100 engines' polls one after the other would be a queue no real fleet has: each
    engine is a process of its own there); ``set_load`` changes one's load."""

    def __init__(self, count: int, directory, per_process: int = 25) -> None:
        path = directory / "vllm.prom"
        path.write_text(fixture("vllm-0.10.0.prom"))
        self.per_process = per_process
        self.processes = [
            subprocess.Popen([sys.executable, "-c", SERVER, str(min(per_process, count - start)),
                              str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
            for start in range(0, count, per_process)]
        self.urls = [f"http://127.0.0.1:{port}/metrics" for process in self.processes
                     for port in json.loads(process.stdout.readline())]
        self.applied: list[tuple[int, int, float]] = []

    def set_load(self, index: int, load: int) -> None:
        process = self.processes[index // self.per_process]
        process.stdin.write(f"{index % self.per_process} {load}\n")
        process.stdin.flush()

    def cpu_s(self) -> float:
        """CPU seconds the engine processes have used."""
        return sum(proc_cpu_s(process.pid) for process in self.processes)

    def close(self) -> None:
        """Stop the engines; ``applied`` then holds each load set: (index, load, wall time)."""
        for number, process in enumerate(self.processes):
            process.stdin.close()
            self.applied += [(number * self.per_process + index, load, at) for index, load, at
                             in json.loads(process.stdout.readline() or "[]")]
            process.wait(timeout=10)

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) process ``pid`` has used, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
