"""``EngineLink``: one kept-alive HTTP/1.1 connection to one engine, h11 over a trio stream.

The hive polls each local engine every ``collect.engine.poll_interval_s`` (20 times a second by
default), so the cost of one GET is paid 20 times a second per engine. Through an
``httpx.AsyncClient`` a GET on a kept-alive connection runs httpx's request and response models,
its transport, httpcore's connection pool and its trio backend; here it is one ``h11`` request
written and parsed on a connection this link keeps for the engine's life
(``bench/test_bench_engine_poll.py`` measures both, on the same engine, in one run). Only GET,
only identity encoding (no gzip to undo on a small JSON answer), one request at a time.

A connection the engine closed between two polls (a restart, an idle timeout) is found when the
next request fails before any answer came back on it: that request is made once more on a fresh
connection. Every other failure (refused, reset mid-answer, malformed HTTP, too slow, too big, not
200) is an ``EngineError`` naming the URL and what went wrong, and the connection is dropped.
"""

from __future__ import annotations

import urllib.parse

import h11
import trio

from .engines import EngineError

READ_CHUNK = 65536
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError)


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
        self._host_header = parts.netloc.encode()
        self._stream: trio.SocketStream | None = None
        self._http: h11.Connection | None = None
        self._requests: dict[str, h11.Request] = {}
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

    async def _connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.connections += 1

    async def _exchange(self, path: str, url: str) -> bytes:
        stream, http = self._stream, self._http
        assert stream is not None and http is not None
        request = self._requests.get(path)
        if request is None:  # made once per path: h11 validates a request's headers when made
            request = self._requests[path] = h11.Request(method="GET", target=path, headers=[
                ("host", self._host_header), ("accept-encoding", "identity")])
        try:
            await stream.send_all(http.send(request) + http.send(h11.EndOfMessage()))
            event = await self._next(stream, http)
        except BROKEN as exc:
            raise _Unanswered() from exc
        if isinstance(event, h11.ConnectionClosed):
            raise _Unanswered()
        assert isinstance(event, h11.Response)
        status = event.status_code
        declared = dict(event.headers).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise EngineError(f"{url} sent {int(declared)} bytes, over collect.engine.max_bytes "
                              f"({self.max_bytes})")
        chunks, size = [], 0
        while True:
            event = await self._next(stream, http)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_bytes:
                    raise EngineError(f"{url} sent more than {self.max_bytes} bytes, over "
                                      f"collect.engine.max_bytes ({self.max_bytes})")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # closed mid-answer
                raise EngineError(f"cannot read {url}: the connection closed mid-answer")
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:  # the engine will close it (HTTP/1.0, Connection: close)
            await self.aclose()
        if status != 200:
            raise EngineStatusError(status, f"HTTP {status} from {url}")
        return b"".join(chunks)

    @staticmethod
    async def _next(stream: trio.SocketStream, http: h11.Connection) -> h11.Event:
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(READ_CHUNK))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            return event

    async def aclose(self) -> None:
        stream, self._stream, self._http = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


class EngineStatusError(EngineError):
    """The engine answered, with a status other than 200 (``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Unanswered(Exception):
    """The connection broke before any answer to this request came back."""
