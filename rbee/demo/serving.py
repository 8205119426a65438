"""The demo engine's HTTP port, as ``vllm serve`` answers on its own: ``GET /metrics``,
``GET /load`` (``{"server_load": N}``, counted only with ``--enable-server-load-tracking``, as in
vLLM: without it the answer stays 0), ``GET /version``, ``GET /v1/models``, and OpenAI-style
``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed (``"stream": true``, Server-Sent
Events ending in ``data: [DONE]``) or not.

Each completion is a request of the simulated scheduler (``SimulatedEngine.submit``): it waits
for a slot, then its tokens come as the scheduler generates them (``tokens_per_s`` shared by the
running requests, one step every ~100 ms), so a stream runs at a realistic rate and slows down
as the engine fills. A client that goes away aborts its request. A bad request gets a 400 in
OpenAI's error shape, an unknown model a 404, as vLLM answers them.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .engine import Request, SimulatedEngine

MAX_BODY = 2**20
MAX_TOKENS = 4096
WAIT_S = 600.0
"""The longest a completion waits for the engine before it is aborted."""
CHECK_S = 0.5
"""How often a request that got no token looks whether its client is still there."""
WORDS = ("the", "hive", "reads", "its", "engines", "and", "the", "queen", "picks", "a", "worker",
         "for", "each", "request", "while", "tokens", "flow", "back")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_text(index: int) -> str:
    return WORDS[index % len(WORDS)] + " "


def prompt_tokens_of(body: dict, chat: bool) -> int:
    """About four characters a token, as a tokenizer would give for English text."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "'messages' must be a non-empty list")
        text = "".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in messages)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequest(400, "'prompt' must be a string or a list")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text) // 4)


class EngineServer:
    """``engine``'s port on ``host:port``, served by daemon threads (one per connection)."""

    def __init__(self, engine: SimulatedEngine, port: int, host: str = "127.0.0.1",
                 load_tracking: bool = False) -> None:
        self.engine = engine
        self.load_tracking = load_tracking
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="demo-engine-http")

    def start(self) -> EngineServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = 65536
            """Head and body leave in one write (flushed after each answer, and after each
            event of a stream): written apart, a kept-alive client's delayed ACK holds the body
            back 40 ms."""

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                engine = server.engine
                if self.path == "/metrics":
                    with engine.changed:
                        body = generate_latest(engine.registry)
                    self.answer(200, body, CONTENT_TYPE_LATEST)
                elif self.path == "/load":
                    load = engine.in_flight() if server.load_tracking else 0
                    self.answer_json(200, {"server_load": load})
                elif self.path == "/version":
                    self.answer_json(200, {"version": "0.10.0+rbee.demo"})
                elif self.path == "/v1/models":
                    self.answer_json(200, {"object": "list", "data": [
                        {"id": engine.model, "object": "model", "owned_by": "rbee-demo"}]})
                elif self.path == "/health":
                    self.answer(200, b"")
                else:
                    self.error(404, f"no route {self.path}")

            def do_POST(self) -> None:
                chat = self.path == "/v1/chat/completions"
                if not chat and self.path != "/v1/completions":
                    self.error(404, f"no route {self.path}")
                    return
                try:
                    body = self.read_json()
                    model = body.get("model", server.engine.model)
                    if model != server.engine.model:
                        raise BadRequest(404, f"The model `{model}` does not exist.")
                    max_tokens = body.get("max_tokens", 16)
                    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
                        raise BadRequest(400, f"'max_tokens' must be an integer in 1..{MAX_TOKENS}")
                    prompt = prompt_tokens_of(body, chat)
                except BadRequest as exc:
                    self.error(exc.status, str(exc))
                    return
                request = server.engine.submit(prompt, max_tokens, time.monotonic())
                try:
                    if body.get("stream"):
                        self.stream(request, chat, model)
                    else:
                        self.complete(request, chat, model)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    if not request.done:
                        server.engine.abort(request)

            def read_json(self) -> dict:
                length = self.headers.get("Content-Length", "")
                if not length.isdigit() or int(length) > MAX_BODY:
                    raise BadRequest(400, f"a JSON body of at most {MAX_BODY} bytes is needed")
                try:
                    body = json.loads(self.rfile.read(int(length)))
                except ValueError as exc:
                    raise BadRequest(400, f"the body is not JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise BadRequest(400, "the body must be a JSON object")
                return body

            def tokens(self, request: Request):
                """Each new token of ``request`` as the scheduler generates it."""
                sent = 0
                deadline = time.monotonic() + WAIT_S
                engine = server.engine
                while sent < request.target_tokens:
                    with engine.changed:
                        engine.changed.wait_for(
                            lambda upto=sent: request.generated > upto or request.done,
                            timeout=CHECK_S)
                        upto = request.generated
                    if self.client_gone() or time.monotonic() >= deadline:
                        return
                    if upto <= sent:
                        if request.done:
                            return
                        continue
                    yield from range(sent, upto)
                    sent = upto

            def client_gone(self) -> bool:
                """The client closed its connection (what a non-streamed request, which writes
                nothing until it ends, would otherwise learn only at the end)."""
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    return True

            def complete(self, request: Request, chat: bool, model: str) -> None:
                text = "".join(token_text(i) for i in self.tokens(request))
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "length"} if chat else
                          {"index": 0, "text": text, "finish_reason": "length"})
                self.answer_json(200, {
                    "id": f"cmpl-{uuid.uuid4().hex}", "model": model, "created": int(time.time()),
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice], "usage": {
                        "prompt_tokens": request.prompt_tokens,
                        "completion_tokens": request.generated,
                        "total_tokens": request.prompt_tokens + request.generated}})

            def stream(self, request: Request, chat: bool, model: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
                kind = "chat.completion.chunk" if chat else "text_completion"
                for index in self.tokens(request):
                    delta = ({"index": 0, "delta": {"content": token_text(index)}} if chat
                             else {"index": 0, "text": token_text(index)})
                    self.chunk(json.dumps({"id": ident, "object": kind, "created": created,
                                           "model": model, "choices": [delta]}))
                self.chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")

            def chunk(self, data: str) -> None:
                event = f"data: {data}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()

            def answer_json(self, status: int, body: dict) -> None:
                self.answer(status, json.dumps(body).encode(), "application/json")

            def error(self, status: int, message: str) -> None:
                kind = "NotFoundError" if status == 404 else "BadRequestError"
                self.answer_json(status, {"error": {"message": message, "type": kind,
                                                    "code": status}})

            def answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
