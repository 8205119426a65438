"""Request bodies within bounds: each request's own limit, a budget shared by all bodies in
flight, a deadline, and gzip inflated only as far as the limit."""

from __future__ import annotations

import zlib

import anyio
from starlette.requests import Request

from .errors import ApiError

BODY_READ = "rbee_body_read"
"""Set in a request's scope once its body was read to the end (else its answer closes)."""


class BodyBudget:
    """The bytes of request bodies being read at once, across connections: with each request's
    own limit, what bounds the memory unfinished uploads can take.

    Large bodies (over 1/64 of the budget) may hold only three quarters of it together: the last
    quarter is kept for small ones, so a few unfinished multi-megabyte uploads cannot lock out the
    hives' few-kilobyte heartbeats."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.small = limit // 64
        self.reserved = 0

    def take(self, size: int, body_size: int) -> None:
        """Reserve ``size`` more bytes for a body of ``body_size`` so far, or refuse (503)."""
        room = self.limit if body_size <= self.small else self.limit - self.limit // 4
        if self.reserved + size > room:
            raise ApiError(503, f"too many request bodies being read at once "
                                f"(http.max_body_bytes_in_flight: {self.limit} bytes); "
                                f"retry later", headers={"retry-after": "1"})
        self.reserved += size

    def give_back(self, size: int) -> None:
        self.reserved -= size


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes (from
    Content-Length before reading, or while reading a chunked body), with 503 when it would take
    the server past its budget of bodies in flight (``BodyBudget``: a declared length is
    reserved whole before a byte is read), and with 408 if it is not in within
    ``http.body_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"invalid Content-Length header: {declared!r}")
        if int(declared) > limit:
            if int(declared) <= DRAIN_MAX_BYTES:
                await _discard(request)
            raise ApiError(413, f"body of {declared} bytes exceeds max_body_bytes ({limit})")
    budget: BodyBudget = request.app.state.body_budget
    reserved = int(declared) if declared is not None else 0
    budget.take(reserved, reserved)
    try:
        with anyio.move_on_after(request.app.state.body_timeout_s) as waited:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body exceeds max_body_bytes ({limit})")
                if size > reserved:  # chunked (or longer than declared: h11 refuses that)
                    budget.take(size - reserved, size)
                    reserved = size
                chunks.append(chunk)
        if waited.cancelled_caught:
            raise ApiError(408, f"body not received within http.body_timeout_s "
                                f"({request.app.state.body_timeout_s:g}s)")
        body = b"".join(chunks)
    finally:
        budget.give_back(reserved)
    request.scope[BODY_READ] = True
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        return gunzip_limited(body, limit)
    if encoding != "identity":
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}: use gzip or none")
    return body


DRAIN_MAX_BYTES = 16 * 2**20
DRAIN_MAX_S = 2.0


async def _discard(request: Request) -> None:
    """Read and drop a refused body of at most ``DRAIN_MAX_BYTES`` (within ``DRAIN_MAX_S``)
    before answering. Many clients (httpx among them) read no answer before they have sent the
    whole body; closing on them mid-upload can leave their send blocked until it times out, so
    they would never see the 413. A larger or slower body is not waited for: the answer and the
    close come at once."""
    with anyio.move_on_after(DRAIN_MAX_S):
        async for _ in request.stream():
            pass


def gunzip_limited(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (413) one that would inflate past ``limit`` bytes before
    inflating it further: a small "zip bomb" costs the server nothing."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ApiError(400, f"invalid gzip body: {exc}") from exc
    if len(data) > limit or inflater.unconsumed_tail:
        raise ApiError(413, f"decompressed body exceeds max_body_bytes ({limit})")
    if not inflater.eof:
        raise ApiError(400, "invalid gzip body: truncated")
    return data
