"""Serving a Starlette app on hypercorn's trio worker, with the connection guard of
``rbee/http/transport.py`` and the deadlines of ``http:`` in the config."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app
from starlette.applications import Starlette

from .._errors import ListenError
from ..config import HttpSettings
from .rawpost import RawRoutes
from .tls import check_server_files
from .transport import ConnectionTable, fit_descriptors, serve_connections

WS_MESSAGE_BODIES = 2
"""The largest WebSocket message hypercorn buffers, in ``http.max_body_bytes``."""


async def serve(app: Starlette, bind: str, port: int, settings: HttpSettings, *,
                shutdown_trigger: Callable[[], Awaitable[None]],
                connections: ConnectionTable | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; reports the bound URLs
    (``http://host:port``, or ``https://`` with ``tls_cert_file``) when listening (port 0 picks a
    free port). Connections are capped and every request phase has its deadline
    (``rbee/http/transport.py``); ``connections``, if given, is the table that counts them (for a
    server's metrics), its limit set here to what the descriptors allow. The app's raw POST routes
(``app.state.raw_posts``) are answered by the connections themselves."""
    http = HypercornConfig()
    address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    http.bind = [address]
    http.insecure_bind = []
    http.graceful_timeout = settings.shutdown_grace_s
    http.keep_alive_timeout = settings.keep_alive_timeout_s
    http.ssl_handshake_timeout = settings.header_timeout_s
    http.backlog = settings.backlog
    http.accesslog = None
    http.errorlog = logging.getLogger("rbee.http")
    # Reads are bounded per phase by rbee/http/transport.py (a plain read timeout would also close stream
    # connections, whose clients send nothing).
    http.read_timeout = None
    http.h2_max_concurrent_streams = 16
    # A WebSocket message (a hive's channel frame) is buffered whole before the app sees it:
    # bounded by the body limit, with room for the channel to answer a frame somewhat over it
    # with a clear 413; a bigger one closes the connection (1009) unread.
    http.websocket_max_message_size = WS_MESSAGE_BODIES * settings.max_body_bytes
    if settings.tls_cert_file is not None:
        check_server_files(settings)
        http.certfile, http.keyfile = settings.tls_cert_file, settings.tls_key_file
    connections = connections or ConnectionTable(settings.max_connections)
    connections.limit = fit_descriptors(settings.max_connections)
    try:
        sockets = http.create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            # Accepted connections inherit it. A client that stops reading leaves hypercorn's
            # (shielded) send blocked, and its connection cannot close until that send ends; the
            # kernel gives up on it after this long, which also bounds any wait at shutdown.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(settings.stall_timeout_s * 1000))
            sock.listen(http.backlog)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}",
                          address=address) from exc
    await serve_connections(wrap_app(app, http.wsgi_max_body_size, "asgi"), http, sockets,
                            settings, connections, shutdown_trigger=shutdown_trigger,
                            task_status=task_status, raw=RawRoutes.of(app.state, settings))
