"""Following the queen's live stream, as ``rbee top`` and ``rbee up`` do.

The client reconnects when the queen goes away (restart, network) and every connection starts
with a snapshot, so the caller's view is whole again at once. httpx-sse does the SSE parsing.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence

import httpx
import trio
from httpx_sse import aconnect_sse

from ._errors import ContractError
from .contract import STREAM_EVENT_NAME, StreamEvent, decode_stream_event, paths

log = logging.getLogger(__name__)



async def follow_stream(queen_url: str, on_event: Callable[[StreamEvent], None], *,
                        on_down: Callable[[str], None] = lambda problem: None,
                        connect_timeout_s: float = 2.0, retry_s: float = 1.0,
                        verify: ssl.SSLContext | bool = True,
                        headers: dict[str, str] | None = None,
                        hives: Sequence[str] = (), models: Sequence[str] = (),
                        events: Sequence[str] = ()) -> None:
    """Call ``on_event`` with every stream event, forever; ``on_down`` with the reason whenever
    the connection is lost, before retrying every ``retry_s``. ``verify``: httpx's, for an
    ``https://`` queen (``rbee.tls.client_verify``); ``headers`` go with every request (the
    queen's read token, ``rbee.auth.bearer``). ``hives``, ``models``, ``events``: the stream's
    filters (none given: everything but ``worker_update``)."""
    params = {name: ",".join(values) for name, values in
              (("hive", hives), ("model", models), ("events", events)) if values}
    timeout = httpx.Timeout(connect_timeout_s, read=None)
    async with httpx.AsyncClient(base_url=queen_url, timeout=timeout, verify=verify,
                                 headers=headers) as client:
        while True:
            try:
                async with aconnect_sse(client, "GET", paths.STREAM, params=params) as source:
                    source.response.raise_for_status()
                    async for sse in source.aiter_sse():
                        if sse.event == STREAM_EVENT_NAME:
                            on_event(decode_stream_event(sse.data))
                problem = "the queen closed the stream"
            except httpx.HTTPStatusError as exc:
                problem = f"HTTP {exc.response.status_code} from {queen_url}{paths.STREAM}"
            except httpx.TransportError as exc:
                problem = f"cannot reach the queen at {queen_url}: {type(exc).__name__}"
            except ContractError as exc:  # not our queen's stream, or a newer one's
                problem = f"unreadable event from {queen_url}{paths.STREAM}: {exc}"
            on_down(problem)
            await trio.sleep(retry_s)
