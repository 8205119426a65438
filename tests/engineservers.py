"""Real HTTP servers on 127.0.0.1 (port 0) that serve engine metrics as the engines do: the
fixture text of ``tests/engine_fixtures/`` (or whatever a test sets), a status, a delay. Each runs
in its own thread (http.server, HTTP/1.1 keep-alive as uvicorn and llama.cpp answer) and is shut
down and closed by the context manager. ``track_load`` makes one answer vLLM's ``GET /load`` as a
server started with ``--enable-server-load-tracking`` does, from the figures it serves."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).parent / "engine_fixtures"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def bump(text: str, sample: str, by: float) -> str:
    """``text`` with the value of every line of ``sample`` (a name, optionally with the start of
    its labels) raised by ``by``: a later scrape of the same engine."""
    pattern = re.compile(rf"^({re.escape(sample)}[^\n]*?) (\S+)$", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)} {float(m.group(2)) + by!r}", text)


def observe(text: str, histogram: str, seconds: float, times: int) -> str:
    """``text`` after the engine observed ``seconds`` ``times`` more in ``histogram``: every
    bucket whose bound holds it, the count and the sum grow, as prometheus-client does it."""
    def raise_bucket(match: re.Match[str]) -> str:
        bound = float(match.group(2))
        value = float(match.group(3)) + (times if seconds <= bound else 0)
        return f"{match.group(1)} {value!r}"

    bucket = re.compile(rf'^({re.escape(histogram)}_bucket\{{[^\n]*?le="([^"]+)"[^\n]*?) (\S+)$',
                        re.MULTILINE)
    text = bucket.sub(raise_bucket, text)
    text = bump(text, f"{histogram}_count", times)
    return bump(text, f"{histogram}_sum", seconds * times)


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    delay_s: float = 0.0
    content_type: str = CONTENT_TYPE
    declare_length: bool = True
    """False: no Content-Length, the body ends when the connection closes (HTTP/1.0)."""
    gzip: bool = False
    """Compress the body (Content-Encoding: gzip) when the client accepts it, as vLLM and
    prometheus-client's own server do."""


class MetricsServer:
    """One engine's metrics port. ``answer`` is what ``GET /metrics`` gets now (tests change it);
    any other path is a 404."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.load_tracking = False
        self.others: dict[str, Answer] = {}
        """Answers for other paths (an engine's info endpoint); anything else is a 404."""
        self.requests = 0
        self.paths: list[str] = []
        self.clients: list[int] = []
        """The client port of each request: a kept-alive client asks from one."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = 65536  # head and body in one write: no delayed-ACK stall on keep-alive

            def do_GET(self) -> None:
                server.requests += 1
                server.paths.append(self.path)
                server.clients.append(self.client_address[1])
                answer = server.answer if self.path == "/metrics" else server.others.get(
                    self.path) or (server.load() if self.path == "/load" else None) or Answer(
                    b"not found", 404)
                time.sleep(answer.delay_s)
                body = answer.body
                compress = answer.gzip and "gzip" in self.headers.get("Accept-Encoding", "")
                if compress:
                    body = gzip.compress(body)
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", answer.content_type)
                    if compress:
                        self.send_header("Content-Encoding", "gzip")
                    if answer.declare_length:
                        self.send_header("Content-Length", str(len(body)))
                    else:  # the body ends when the connection does
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the scraper gave up first: what a slow engine sees

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def serve_text(self, text: str) -> None:
        self.answer = Answer(text.encode())

    def track_load(self) -> None:
        """Answer ``GET /load`` as vLLM does with ``--enable-server-load-tracking``: the requests
        in flight, here running and waiting of the exposition it serves now."""
        self.load_tracking = True

    def load(self) -> Answer | None:
        if not self.load_tracking:
            return None
        text = self.answer.body.decode()
        in_flight = sum(float(m.group(2)) for m in re.finditer(
            r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE))
        return Answer(json.dumps({"server_load": round(in_flight)}).encode(),
                      content_type="application/json")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@contextmanager
def metrics_servers(*answers: Answer | str) -> Iterator[list[MetricsServer]]:
    servers = [MetricsServer(Answer(a.encode()) if isinstance(a, str) else a) for a in answers]
    try:
        yield servers
    finally:
        for server in servers:
            server.close()
