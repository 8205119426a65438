"""The hive channel a connection serves itself (rbee/http/rawchannel.py) against the same channel
through hypercorn and Starlette, over raw sockets to a real queen on 127.0.0.1: the handshake,
its refusal, error frames, ping and close, fragments, oversize and broken frames answer alike.

A handshake goes to the app when the connection does not take it: here, one with a header sent
twice (repeated fields are the app's to combine), which changes nothing else. Which server
answered shows in the 101: hypercorn's carries a ``date``, the connection's does not."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest
import trio

from rbee.contract import (
    ChannelAck,
    ChannelDelta,
    ChannelError,
    ChannelResync,
    ChannelSnapshot,
    decode_queen_frame,
    encode_frame,
    paths,
    utc_now,
)

from .builders import heartbeat, worker
from .queenkit import start_queen, wait_until

PATHS = ["raw", "app"]
BINARY, TEXT, CLOSE, PING, PONG, CONTINUATION = 0x2, 0x1, 0x8, 0x9, 0xA, 0x0


def client_frame(opcode: int, payload: bytes, *, final: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    """A frame as a client sends it (masked unless told), with a random mask."""
    size = len(payload)
    first = (0x80 if final else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Ws:
    """A WebSocket client on a raw socket: the upgrade, frames out, frames in."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock, self.buffer = sock, b""

    async def fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            data = await self.sock.recv(65536)
            if not data:
                return False
            self.buffer += data
        return True

    async def head(self) -> tuple[int, dict[str, str], bytes]:
        """The answer to the upgrade: status, headers, and the body when it has one."""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buffer:
                assert await self.fill(len(self.buffer) + 1), self.buffer
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {name.lower(): value for name, value in
                       (line.split(": ", 1) for line in lines[1:])}
            size = int(headers.get("content-length", 0))
            await self.fill(size)
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(lines[0].split()[1]), headers, body

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame from the queen (opcode, payload); None once the connection ended."""
        with trio.fail_after(10):
            if not await self.fill(2):
                return None
            assert not self.buffer[1] & 0x80, "a server's frame is never masked"
            size, start = self.buffer[1] & 0x7F, 2
            if size == 126:
                await self.fill(4)
                size, start = int.from_bytes(self.buffer[2:4], "big"), 4
            assert await self.fill(start + size)
        opcode, payload = self.buffer[0] & 0x0F, self.buffer[start:start + size]
        self.buffer = self.buffer[start + size:]
        return opcode, payload

    async def send(self, *frames: bytes) -> None:
        await self.sock.send(b"".join(frames))

    async def talk(self, frame) -> object:
        """Send one binary frame; the queen's answer frame, decoded."""
        await self.send(client_frame(BINARY, frame if isinstance(frame, bytes)
                                     else encode_frame(frame)))
        opcode, payload = await self.frame()
        assert opcode == BINARY, (opcode, payload)
        return decode_queen_frame(payload)

    async def closed(self) -> tuple[int, str]:
        """The close frame's code and reason; the connection ends after it."""
        opcode, payload = await self.frame()
        assert opcode == CLOSE, (opcode, payload)
        await self.send(client_frame(CLOSE, payload[:2]))
        with trio.fail_after(10):
            while await self.sock.recv(65536):
                pass
        return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def upgrade(path: str, extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    via = b"x-via: app\r\nx-via: app\r\n" if path == "app" else b""
    return (b"GET %s HTTP/1.1\r\nhost: queen\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-version: 13\r\nsec-websocket-key: %s\r\n%s%s\r\n"
            % (paths.CHANNEL.encode(), key, via, extra))


async def open_ws(queen, path: str, extra: bytes = b"") -> Ws:
    port = int(queen.urls[0].rsplit(":", 1)[1])
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    ws = Ws(sock)
    await ws.send(upgrade(path, extra))
    return ws


async def opened(queen, path: str) -> Ws:
    ws = await open_ws(queen, path)
    status, headers, _ = await ws.head()
    assert status == 101, status
    assert ("date" in headers) == (path == "app"), headers  # which server answered
    assert "sec-websocket-extensions" not in headers
    return ws


@pytest.mark.parametrize("path", PATHS)
async def test_a_snapshot_and_a_delta_on_either_server(nursery, path):
    queen = await start_queen(nursery)
    ws = await opened(queen, path)
    first = heartbeat("hive-a", [worker("w0"), worker("w1")])
    assert await ws.talk(ChannelSnapshot(seq=0, heartbeat=first)) == ChannelAck(0)
    assert queen.metrics.channels._value.get() == 1
    # two frames in one write: answered in order
    await ws.send(client_frame(BINARY, encode_frame(ChannelDelta(
        seq=1, timestamp=utc_now(), gone=[("llm", "w0")]))),
        client_frame(BINARY, encode_frame(ChannelDelta(seq=2, timestamp=utc_now()))))
    for seq in (1, 2):
        assert decode_queen_frame((await ws.frame())[1]) == ChannelAck(seq)
    assert [w.instance for w in queen.registry.get_workers("hive-a")] == ["w1"]
    assert queen.metrics.received._value.get() == 3
    ws.sock.close()


async def test_a_refused_upgrade_reads_the_same_on_either_path(nursery, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-rawchannel\n")
    queen = await start_queen(nursery, auth_token_file=str(token))
    answers = []
    for path in PATHS:
        ws = await open_ws(queen, path, b"authorization: Bearer wrong-token-for-rawchannel\r\n")
        status, headers, body = await ws.head()
        answers.append((status, headers["www-authenticate"], json.loads(body)))
        ws.sock.close()
    assert answers[0] == answers[1], answers
    assert answers[0][0] == 401 and "wrong token" in answers[0][2]["message"], answers
    assert queen.metrics.refused.labels("unauthorized")._value.get() == 2
    ws = await open_ws(queen, "raw", b"authorization: Bearer s3cret-token-for-rawchannel\r\n")
    status, headers, _ = await ws.head()
    assert status == 101 and "date" not in headers
    ws.sock.close()


async def test_the_channel_off_refuses_on_either_path(nursery):
    queen = await start_queen(nursery, channel_enabled=False)
    for path in PATHS:
        ws = await open_ws(queen, path)
        assert (await ws.head())[0] == 403
        ws.sock.close()


async def test_error_frames_read_the_same_on_either_path(nursery):
    """Garbage, a text frame, a delta with no snapshot, another hive's snapshot: byte for byte
    the same answers."""
    queen = await start_queen(nursery)
    answers = {}
    for path in PATHS:
        ws = await opened(queen, path)
        got = []
        for opcode, payload in [
                (BINARY, b"\xc1"), (TEXT, b"hello"), (BINARY, b""),
                (BINARY, encode_frame(ChannelDelta(seq=0, timestamp="2026-01-01T00:00:00Z"))),
                (BINARY, encode_frame(ChannelSnapshot(seq=1, heartbeat=heartbeat(
                    f"hive-{path}")))),
                (BINARY, encode_frame(ChannelSnapshot(seq=2, heartbeat=heartbeat("hive-z"))))]:
            await ws.send(client_frame(opcode, payload))
            got.append(await ws.frame())
        answers[path] = got
        ws.sock.close()
    assert answers["raw"] == [(opcode, payload.replace(b"hive-app", b"hive-raw"))
                              for opcode, payload in answers["app"]]
    decoded = [decode_queen_frame(payload) for _, payload in answers["raw"]]
    assert [type(answer) for answer in decoded] == [
        ChannelError, ChannelError, ChannelError, ChannelResync, ChannelAck, ChannelError]
    assert "not a msgpack frame" in decoded[0].message
    assert "a text frame" in decoded[1].message
    assert "on the channel of hive 'hive-raw'" in decoded[5].message


@pytest.mark.parametrize("path", PATHS)
async def test_ping_fragments_and_close(nursery, path):
    """A ping is answered at once, even between the fragments of a message; the fragments make
    one frame for the channel; a close is echoed and ends the connection."""
    queen = await start_queen(nursery)
    ws = await opened(queen, path)
    await ws.send(client_frame(PING, b"are you there"))
    assert await ws.frame() == (PONG, b"are you there")
    data = encode_frame(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a", [worker("w0")])))
    third = len(data) // 3
    await ws.send(client_frame(BINARY, data[:third], final=False),
                  client_frame(PING, b"mid"),
                  client_frame(CONTINUATION, data[third:2 * third], final=False),
                  client_frame(CONTINUATION, data[2 * third:]))
    assert await ws.frame() == (PONG, b"mid")
    assert decode_queen_frame((await ws.frame())[1]) == ChannelAck(0)
    await ws.send(client_frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
    opcode, payload = await ws.frame()
    assert opcode == CLOSE and struct.unpack("!H", payload[:2])[0] == 1000
    with trio.fail_after(10):
        assert await ws.sock.recv(100) == b""
    ws.sock.close()
    assert queen.registry.knows("hive-a")


@pytest.mark.parametrize("path", PATHS)
async def test_a_frame_over_the_limit(nursery, path):
    """Somewhat over ``http.max_body_bytes``: the channel's 413, and it goes on; over twice
    that: closed, 1009, unread."""
    queen = await start_queen(nursery, http={"max_body_bytes": 4096})
    ws = await opened(queen, path)
    answer = await ws.talk(b"\x00" * 5000)
    assert answer == ChannelError(status=413, message=(
        "frame of 5000 bytes, more than http.max_body_bytes (4096)"))
    first = heartbeat("hive-a", [worker("w0")])
    assert await ws.talk(ChannelSnapshot(seq=0, heartbeat=first)) == ChannelAck(0)
    await ws.send(client_frame(BINARY, b"\x00" * 9000))
    code, _ = await ws.closed()
    assert code == 1009
    ws.sock.close()


@pytest.mark.parametrize(("what", "frame"), [
    ("unmasked", client_frame(BINARY, b"\x90", masked=False)),
    ("reserved bits", client_frame(BINARY, b"\x90", rsv=0x40)),
    ("a continuation out of place", client_frame(CONTINUATION, b"\x90")),
    ("a long ping", client_frame(PING, b"x" * 126)),
    ("an unknown opcode", client_frame(0x3, b"\x90")),
], ids=lambda value: value if isinstance(value, str) else "")
@pytest.mark.parametrize("path", PATHS)
async def test_a_broken_frame_ends_the_channel(nursery, what, frame, path):
    """Closed with 1002 naming the problem on the connection's own path; hypercorn (wsproto)
    drops the connection without a close frame, the one difference between the two."""
    queen = await start_queen(nursery)
    ws = await opened(queen, path)
    assert await ws.talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
    await ws.send(frame)
    if path == "raw":
        code, reason = await ws.closed()
        assert code == 1002 and reason, (what, reason)
    else:
        assert await ws.frame() is None, what
    ws.sock.close()
    await wait_until(lambda: queen.metrics.channels._value.get() == 0)
    assert queen.registry.knows("hive-a")


async def test_a_text_message_that_is_not_utf8_closes_with_1007(nursery):
    queen = await start_queen(nursery)
    ws = await opened(queen, "raw")
    await ws.send(client_frame(TEXT, b"\xff\xfe"))
    assert await ws.closed() == (1007, "a text message that is not UTF-8")
    ws.sock.close()


@pytest.mark.parametrize("path", PATHS)
async def test_an_idle_channel_is_closed(nursery, path):
    queen = await start_queen(nursery, http={"keep_alive_timeout_s": 1.0})
    ws = await opened(queen, path)
    assert await ws.talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
    assert await ws.closed() == (1000, "no frame for http.keep_alive_timeout_s (1s)")
    ws.sock.close()


async def test_permessage_deflate_offered_is_not_negotiated(nursery):
    queen = await start_queen(nursery)
    ws = await open_ws(queen, "raw", b"sec-websocket-extensions: permessage-deflate; "
                                     b"client_max_window_bits\r\n")
    status, headers, _ = await ws.head()
    assert status == 101 and "sec-websocket-extensions" not in headers and "date" not in headers
    assert await ws.talk(ChannelSnapshot(seq=0, heartbeat=heartbeat("hive-a"))) == ChannelAck(0)
    ws.sock.close()


@pytest.mark.parametrize(("what", "head", "status"), [
    ("version 8", b"sec-websocket-version: 8\r\nsec-websocket-key: %s\r\n", 400),
    ("a key of 4 bytes", b"sec-websocket-version: 13\r\nsec-websocket-key: AAAAAA==\r\n", 101),
])
async def test_an_upgrade_the_connection_does_not_take_is_the_apps(nursery, what, head, status):
    """Handed to hypercorn with every byte read: it answers as it always did (its 400 for a
    version it does not speak; its 101, dated, for a key it does not check)."""
    queen = await start_queen(nursery)
    port = int(queen.urls[0].rsplit(":", 1)[1])
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))
        ws = Ws(sock)
        key = base64.b64encode(os.urandom(16))
        await ws.send(b"GET %s HTTP/1.1\r\nhost: queen\r\nupgrade: websocket\r\n"
                      b"connection: Upgrade\r\n%s\r\n" % (paths.CHANNEL.encode(),
                                                          head.replace(b"%s", key)))
        got, headers, _ = await ws.head()
    assert got == status and "date" in headers, (what, got, headers)
