"""What trio's loop spends to take one message off one of many sockets and answer it, nothing
else done with it: a task per socket, as each hive channel is served now, against one task
reading every ready socket of an epoll set (registered once, edge-triggered):

    python bench/hubfloor.py [N]

N socket pairs (default 3,000); each round writes a 1.5 KB message on every pair and reads the
2-byte answers, in a thread beside the loop; each way runs twice, alternating, and prints the
loop thread's CPU time per message (``time.thread_time``). The difference is the most a
channel frame could save by not waking a task of its own (docs/scale.md).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import trio

ROUNDS = 5
MESSAGE = b"x" * 1500


async def task_per_socket(sock: socket.socket) -> None:
    fd = sock.fileno()
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 65536):
            return
        os.write(fd, b"ok")


async def one_task_for_all(socks: list[socket.socket]) -> None:
    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLET)
    try:
        while True:
            await trio.lowlevel.wait_readable(poller.fileno())
            for fd, _ in poller.poll(0, 4096):
                while True:  # edge-triggered: read until the socket is empty
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        break
                    os.write(fd, b"ok")
    finally:
        poller.close()


async def measure(n: int, hub: bool) -> float:
    pairs = [socket.socketpair() for _ in range(n)]
    for served, _ in pairs:
        served.setblocking(False)

    def drive() -> None:
        for _ in range(ROUNDS):
            for _, client in pairs:
                client.send(MESSAGE)
            for _, client in pairs:
                client.recv(16)

    try:
        async with trio.open_nursery() as nursery:
            if hub:
                nursery.start_soon(one_task_for_all, [served for served, _ in pairs])
            else:
                for served, _ in pairs:
                    nursery.start_soon(task_per_socket, served)
            await trio.sleep(0.2)
            started = time.thread_time()
            await trio.to_thread.run_sync(drive)
            spent = time.thread_time() - started
            nursery.cancel_scope.cancel()
    finally:
        for served, client in pairs:
            served.close()
            client.close()
    return spent / (n * ROUNDS)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for _ in range(2):
        for hub in (False, True):
            way = "one task for all" if hub else "a task per socket"
            print(f"{way:>18}, {n} sockets: {trio.run(measure, n, hub) * 1e6:.1f} µs a message")


if __name__ == "__main__":
    main()
