"""The stream's SSE frames, put together as bytes on the hot path (``Broadcaster.frame``), are
byte for byte what sse-starlette's ``ServerSentEvent`` writes, which still writes the rare others."""

from __future__ import annotations

import pytest
from sse_starlette import ServerSentEvent

from rbee.config import RegistrySettings
from rbee.contract import STREAM_EVENT_NAME, LaggedEvent, decode_heartbeat, encode, utc_now
from rbee.queen.broadcast import Broadcaster
from rbee.queen.store import telemetry_event

from .fleetload import eight_gpu_heartbeat


def broadcaster() -> Broadcaster:
    return Broadcaster(client_buffer=8, max_clients=1, snapshot=lambda: None,
                       client_buffer_bytes=2**20, write_chunk_bytes=2**16)


EVENT = telemetry_event(decode_heartbeat(eight_gpu_heartbeat("hive-frames", 1)), RegistrySettings())


@pytest.mark.parametrize(("event", "event_id", "retry_ms"), [
    (EVENT, "1733412345678901", None),
    (EVENT, "1733412345678901-0", None),
    (LaggedEvent(dropped=3, timestamp=utc_now()), None, None),
    (encode(EVENT), "7", None),
    (EVENT, "7", 1000),                     # with a retry: sse-starlette's
    (b'{"a":\n1}', "8", None),              # a line break in the data: sse-starlette's
    (b'{"a":1}', "bad\nid", None),          # and in the id
])
def test_a_frame_is_what_sse_starlette_writes(event, event_id, retry_ms):
    data = event if isinstance(event, bytes) else encode(event)
    expected = ServerSentEvent(data.decode(), event=STREAM_EVENT_NAME, id=event_id,
                               retry=retry_ms).encode()
    assert broadcaster().frame(event, event_id, retry_ms=retry_ms) == expected
