"""The heartbeat a connection answers itself (rbee/http/rawpost.py), against a real queen on
127.0.0.1 over raw sockets: answers the same as the Starlette app's, requests it does not take
handed to the app with every byte, pipelined requests in order, and idle connections that do not
hold up a stop."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import trio

from rbee.contract import encode
from rbee.contract.paths import HEARTBEAT

from .builders import fleet_heartbeat
from .queenkit import start_queen


def post(body: bytes, *, extra: bytes = b"", path: bytes = HEARTBEAT.encode()) -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: queen\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n%s" % (path, len(body), extra, body))


def chunked(body: bytes) -> bytes:
    """The same POST, chunked: a request the connection leaves to the app."""
    return (b"POST %s HTTP/1.1\r\nhost: queen\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (HEARTBEAT.encode(), len(body), body))


class Answers:
    """HTTP/1.1 answers read off one socket, one by one (content-length bodies)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock, self.buffer = sock, b""

    async def next(self) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                data = await self.sock.recv(65536)
                assert data, f"closed with {self.buffer!r} read"
                self.buffer += data
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {name.lower(): value for name, value in
                       (line.split(": ", 1) for line in lines[1:])}
            size = int(headers["content-length"])
            while len(self.buffer) < size:
                self.buffer += await self.sock.recv(65536)
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(lines[0].split()[1]), headers, body


async def connect(queen) -> trio.socket.SocketType:
    port = int(queen.urls[0].rsplit(":", 1)[1])
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def test_pipelined_heartbeats_then_a_request_for_the_app_on_one_connection(nursery):
    queen = await start_queen(nursery)
    body = encode(fleet_heartbeat("hive-raw", 8))
    with await connect(queen) as sock:
        answers = Answers(sock)
        zipped = gzip.compress(body)
        await sock.send(post(body) + post(zipped, extra=b"content-encoding: gzip\r\n")
                        + b"GET /health HTTP/1.1\r\nhost: queen\r\n\r\n")
        for _ in range(2):
            status, headers, answer = await answers.next()
            assert status == 200 and headers["content-type"] == "application/json", answer
            assert json.loads(answer) == {
                "status": "ok", "message": "heartbeat from hive 'hive-raw' with 8 workers received"}
        status, _, answer = await answers.next()
        assert status == 200 and json.loads(answer)["hives"] == 1, answer
    assert queen.metrics.received._value.get() == 2
    assert queen.registry.knows("hive-raw")


async def test_a_refusal_reads_the_same_on_either_path(nursery):
    """A heartbeat refused once its body is read (truncated JSON, another hive's id): the same
    status and JSON whether the connection answered it or the app did (chunked, the app's)."""
    queen = await start_queen(nursery)
    truncated = encode(fleet_heartbeat("hive-raw", 1))[:-1]
    answered = []
    for request in (post(truncated), chunked(truncated)):
        with await connect(queen) as sock:
            await sock.send(request)
            status, _, answer = await Answers(sock).next()
            answered.append((status, answer))
    assert answered[0] == answered[1], answered
    assert answered[0][0] == 400 and b"invalid heartbeat" in answered[0][1], answered


async def test_a_body_over_the_limit_is_the_apps_to_refuse(nursery):
    queen = await start_queen(nursery, http={"max_body_bytes": 4096})
    with await connect(queen) as sock:
        await sock.send(post(b"x" * 5000))
        status, _, answer = await Answers(sock).next()
    assert status == 413 and json.loads(answer)["message"] == (
        "body of 5000 bytes exceeds max_body_bytes (4096)"), answer


async def test_a_wrong_token_is_refused_by_the_app_before_the_body(nursery, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-rawpost\n")
    queen = await start_queen(nursery, auth_token_file=str(token))
    body = encode(fleet_heartbeat("hive-raw", 1))
    with await connect(queen) as sock:
        answers = Answers(sock)
        await sock.send(post(body, extra=b"authorization: Bearer s3cret-token-for-rawpost\r\n"))
        status, _, answer = await answers.next()
        assert status == 200, answer
        await sock.send(post(body, extra=b"authorization: Bearer wrong-token-for-rawpost\r\n"))
        status, headers, answer = await answers.next()
        assert status == 401 and headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert re.search(r"wrong token", json.loads(answer)["message"]), answer


async def test_idle_raw_connections_do_not_hold_up_a_stop():
    """A stop closes connections waiting between heartbeats at once, not after the grace."""
    async with trio.open_nursery() as nursery:
        queen = await start_queen(nursery, http={"shutdown_grace_s": 60,
                                                 "keep_alive_timeout_s": 60})
        socks = []
        for n in range(20):
            sock = await connect(queen)
            await sock.send(post(encode(fleet_heartbeat(f"hive-{n}", 1))))
            status, _, _ = await Answers(sock).next()
            assert status == 200
            socks.append(sock)
        with trio.fail_after(10):  # well under the 60 s grace
            queen.stop()
            await queen.stopped.wait()
        for sock in socks:
            assert await sock.recv(10) == b""
            sock.close()


@pytest.mark.parametrize(("what", "request_bytes", "status"), [
    ("HTTP/1.0", b"POST %s HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}", 400),
    ("two lengths", b"POST %s HTTP/1.1\r\nhost: q\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
     400),
    ("a folded header", b"POST %s HTTP/1.1\r\nhost: q\r\nx-a: 1\r\n  2\r\ncontent-length: 2\r\n\r\n{}",
     400),
    ("a GET", b"GET %s HTTP/1.1\r\nhost: q\r\n\r\n", 405),
    ("no host", b"POST %s HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}", 400),
])
async def test_heads_the_connection_does_not_take_are_answered_by_the_app(
        nursery, what, request_bytes, status):
    """After a raw heartbeat on the same connection: the next request, one the connection does
    not take, gets what hypercorn and the app answer it (h11's 400s, Starlette's 405)."""
    queen = await start_queen(nursery)
    with await connect(queen) as sock:
        answers = Answers(sock)
        await sock.send(post(encode(fleet_heartbeat("hive-raw", 1))))
        assert (await answers.next())[0] == 200
        await sock.send(request_bytes % HEARTBEAT.encode())
        got, _, answer = await answers.next()
    assert got == status, (what, answer)


@pytest.mark.parametrize("phase", ["headers", "body"])
async def test_a_slow_request_on_a_raw_connection_is_cut_at_its_deadline(nursery, phase):
    queen = await start_queen(nursery, http={"header_timeout_s": 0.5, "body_timeout_s": 0.5})
    body = encode(fleet_heartbeat("hive-raw", 1))
    with await connect(queen) as sock:
        answers = Answers(sock)
        await sock.send(post(body))
        assert (await answers.next())[0] == 200
        request = post(body)
        cut = request.index(b"\r\n\r\n") - 10 if phase == "headers" else len(request) - 10
        await sock.send(request[:cut])
        with trio.fail_after(10):
            assert await sock.recv(100) == b""  # closed, unanswered
    assert queen.connections.timed_out_total == 1
