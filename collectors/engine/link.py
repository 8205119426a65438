"""``EngineLink``: one kept-alive HTTP/1.1 connection to one engine, over a trio stream.

The hive polls each local engine every ``collect.engine.poll_interval_s`` (20 times a second by
default), so the cost of one GET is paid 20 times a second per engine. Through an
``httpx.AsyncClient`` a GET on a kept-alive connection runs httpx's request and response models,
its transport, httpcore's connection pool and h11; through h11 alone over a trio stream it costs
a third of that, and h11's event machinery is still half of what is left. So the link writes
its request bytes (made once per path) and reads the answer itself: a status line, headers, and
a body by ``Content-Length``, chunked, or up to the close, which is all an engine's answer to a
GET is (``bench/test_bench_engine_poll.py`` measures the three on the same engine, in one run).
Only GET, only identity encoding (no gzip to undo on a small JSON answer), one request at a time.

A connection the engine closed between two polls (a restart, an idle timeout) is found when the
next request gets no byte of an answer: that request is made once more on a fresh connection.
Every other failure (refused, reset mid-answer, malformed HTTP, a head over ``MAX_HEAD``, too
slow, too big, not 200) is an ``EngineError`` naming the URL and what went wrong, and the
connection is dropped.
"""

from __future__ import annotations

import os
import urllib.parse

import trio

from .engines import EngineError

READ_CHUNK = 65536
MAX_HEAD = 16384
"""Longest status line and headers taken from an engine."""
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class EngineLink:
    """GETs to one engine's origin (``http://host:port``), one at a time, on one connection."""

    def __init__(self, url: str, timeout_s: float, max_bytes: int) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise EngineError(f"{url}: the hive polls engines over plain http://host:port")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.origin = f"http://{parts.netloc}"
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._host = parts.netloc
        self._stream: trio.SocketStream | None = None
        self._buffer = b""
        self._requests: dict[str, bytes] = {}
        self.connections = 0
        """Connections opened so far (a kept-alive link opens one)."""

    async def get(self, path: str) -> bytes:
        """The body of ``GET path`` (with its query). EngineError for anything but a 200 with a
        body of at most ``max_bytes``, for no answer within ``timeout_s`` (the whole exchange,
        connecting included), or for a broken connection or malformed HTTP."""
        url = self.origin + path
        try:
            with trio.fail_after(self.timeout_s):
                if self._stream is not None:
                    try:
                        return await self._exchange(path, url)
                    except _Unanswered:
                        await self.aclose()  # closed by the engine while idle: once more, afresh
                await self._connect()
                try:
                    return await self._exchange(path, url)
                except _Unanswered as exc:
                    raise EngineError(f"cannot read {url}: the engine closed the connection "
                                      f"({exc.__cause__ or 'no answer'})") from exc
        except trio.TooSlowError:
            await self.aclose()
            raise EngineError(f"no answer from {url} within {self.timeout_s:g}s") from None
        except EngineError:
            await self.aclose()
            raise
        except BROKEN as exc:
            await self.aclose()
            raise EngineError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled mid-answer: what the connection holds is unknown
            self.close()
            raise

    async def _connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        self._buffer = b""
        self.connections += 1

    async def _exchange(self, path: str, url: str) -> bytes:
        stream = self._stream
        assert stream is not None
        request = self._requests.get(path)
        if request is None:
            if any(c in path for c in " \r\n") or not path.startswith("/"):
                raise EngineError(f"{url}: not a path to ask an engine for")
            request = self._requests[path] = (
                f"GET {path} HTTP/1.1\r\nHost: {self._host}\r\n"
                "Accept-Encoding: identity\r\n\r\n").encode()
        try:
            await stream.send_all(request)
            head = await self._head(stream, url)
        except BROKEN as exc:
            raise _Unanswered() from exc
        status, headers, keep_alive = _parse_head(head, url)
        if status != 200:  # the body is not wanted: the connection is not reused
            await self.aclose()
            raise EngineStatusError(status, f"HTTP {status} from {url}")
        body = await self._body(stream, headers, url)
        if not keep_alive or self._buffer:  # HTTP/1.0, Connection: close, or bytes unasked for
            await self.aclose()
        return body

    async def _head(self, stream: trio.SocketStream, url: str) -> bytes:
        """The status line and headers of the next answer (1xx answers skipped)."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise EngineError(f"{url} sent a head over {MAX_HEAD} bytes")
                data = await stream.receive_some(READ_CHUNK)
                if not data:
                    if self._buffer:
                        raise EngineError(f"cannot read {url}: the connection closed mid-answer")
                    raise _Unanswered()
                self._buffer += data
                continue
            head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
            if not head.startswith((b"HTTP/1.1 1", b"HTTP/1.0 1")):
                return head

    async def _fill(self, stream: trio.SocketStream, size: int, url: str) -> None:
        """At least ``size`` bytes in the buffer; an error if the connection ends first."""
        while len(self._buffer) < size:
            data = await stream.receive_some(READ_CHUNK)
            if not data:
                raise EngineError(f"cannot read {url}: the connection closed mid-answer")
            self._buffer += data

    async def _body(self, stream: trio.SocketStream, headers: dict[bytes, bytes], url: str
                    ) -> bytes:
        too_big = EngineError(f"{url} sent more than {self.max_bytes} bytes, over "
                              f"collect.engine.max_bytes ({self.max_bytes})")
        if b"transfer-encoding" in headers:
            if headers[b"transfer-encoding"].lower() != b"chunked":
                raise EngineError(f"{url}: unsupported Transfer-Encoding "
                                  f"{headers[b'transfer-encoding'][:40]!r}")
            return await self._chunked(stream, url, too_big)
        declared = headers.get(b"content-length")
        if declared is None:  # the body ends with the connection
            while True:
                if len(self._buffer) > self.max_bytes:
                    raise too_big
                data = await stream.receive_some(READ_CHUNK)
                if not data:
                    body, self._buffer = self._buffer, b""
                    await self.aclose()
                    return body
                self._buffer += data
        if not declared.isdigit():
            raise EngineError(f"{url}: bad Content-Length {declared[:40]!r}")
        size = int(declared)
        if size > self.max_bytes:
            raise EngineError(f"{url} sent {size} bytes, over collect.engine.max_bytes "
                              f"({self.max_bytes})")
        await self._fill(stream, size, url)
        body, self._buffer = self._buffer[:size], self._buffer[size:]
        return body

    async def _chunked(self, stream: trio.SocketStream, url: str, too_big: EngineError) -> bytes:
        chunks, total = [], 0
        while True:
            while (end := self._buffer.find(b"\r\n")) < 0:
                await self._fill(stream, len(self._buffer) + 1, url)
                if len(self._buffer) > MAX_HEAD:
                    raise EngineError(f"{url}: a chunk size line over {MAX_HEAD} bytes")
            line = self._buffer[:end].split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise EngineError(f"{url}: bad chunk size {line[:40]!r}") from None
            if size < 0:
                raise EngineError(f"{url}: bad chunk size {line[:40]!r}")
            total += size
            if total > self.max_bytes:
                raise too_big
            await self._fill(stream, end + 2 + size + 2, url)
            chunk = self._buffer[end + 2:end + 2 + size]
            if self._buffer[end + 2 + size:end + 4 + size] != b"\r\n":
                raise EngineError(f"{url}: a chunk does not end where its size says")
            self._buffer = self._buffer[end + 4 + size:]
            if size == 0:  # no trailers from an engine: the last chunk ends the answer
                return b"".join(chunks)
            chunks.append(chunk)

    async def aclose(self) -> None:
        stream, self._stream, self._buffer = self._stream, None, b""
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def close(self) -> None:
        """Drop the connection now, without waiting (a cancelled exchange, a teardown; also
        after the trio run that opened it has ended)."""
        stream, self._stream, self._buffer = self._stream, None, b""
        if stream is not None:
            try:
                stream.socket.close()
            except RuntimeError:  # no trio run to tell: the OS socket alone
                os.close(stream.socket.detach())


def _parse_head(head: bytes, url: str) -> tuple[int, dict[bytes, bytes], bool]:
    """Status, headers (names lower-cased) and whether the connection stays open."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or rest[3:4] not in (
            b" ", b""):
        raise EngineError(f"cannot read {url}: not an HTTP answer: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise EngineError(f"cannot read {url}: bad header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    connection = headers.get(b"connection", b"").lower()
    keep_alive = b"close" not in connection if version == b"HTTP/1.1" \
        else b"keep-alive" in connection
    return int(code), headers, keep_alive


class EngineStatusError(EngineError):
    """The engine answered, with a status other than 200 (``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Unanswered(Exception):
    """The connection broke before any answer to this request came back."""
