"""The channel's WebSocket frames on the queen, per frame: wsproto's ``Connection`` (what
hypercorn runs, usable without it) against the frame code of ``rbee/http/rawchannel.py``, on the
frames ``tests/fleetload.py``'s hives send (a masked eight-GPU snapshot, a masked delta), each
read and answered by one ack frame; and ``rbee-py``, the same code with the payload unmasked by
the pure-Python twin (``rbee/http/masking.py``) in place of the Cython extension
(``ext/_cmask.pyx``). Same run, same frames; the summary prints µs per frame and the ratios.

    .venv/bin/python -m pytest -n 0 -s bench/test_bench_rawchannel.py
"""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from rbee.contract import ChannelAck, encode_frame
from rbee.hive.channel import FrameMaker
from rbee.http import masking, rawchannel
from rbee.http.rawchannel import RawWebSocket, frame
from tests.fleetload import channel_deltas, eight_gpu_hive, masked

from .conftest import FIGURES, MEDIANS, record

ACK = encode_frame(ChannelAck(12345))
FRAMES = {"snapshot": masked(FrameMaker().frame(eight_gpu_hive("bench-hive", 0), True)),
          "delta": channel_deltas()[0]}
ROUNDS = 2000


class _NoConnection:
    def socket_fd(self) -> None:
        return None


def by_wsproto(data: bytes) -> None:
    connection = Connection(ConnectionType.SERVER)
    for _ in range(ROUNDS):
        connection.receive_data(data)
        for event in connection.events():
            assert event.message_finished
        connection.send(BytesMessage(data=ACK))


def by_rbee(data: bytes) -> None:
    socket = RawWebSocket(_NoConnection(), 1 << 20, None)
    for _ in range(ROUNDS):
        socket.buffer = data
        opcode, final, payload = socket._next_frame()
        assert final and opcode == 2 and payload
        frame(2, ACK)


@pytest.mark.parametrize("codec", ["wsproto", "rbee-py", "rbee"])
@pytest.mark.parametrize("kind", list(FRAMES))
def test_frame_codec(benchmark, monkeypatch, kind, codec):
    data = FRAMES[kind]
    if codec == "rbee-py":
        monkeypatch.setattr(rawchannel, "unmask", masking.py_unmask)
    benchmark.pedantic(by_wsproto if codec == "wsproto" else by_rbee, (data,), rounds=20,
                       iterations=1, warmup_rounds=2)
    name = f"channel frame {kind} {codec}"
    record(benchmark, name)
    FIGURES[f"{name} ({len(data):,} B)"] = f"{MEDIANS[name] / ROUNDS * 1e6:.2f} µs per frame"
    if codec == "rbee":
        for other in ("wsproto", "rbee-py"):
            if (slower := MEDIANS.get(f"channel frame {kind} {other}")):
                FIGURES[f"channel frame {kind} {other}/rbee"] = f"{slower / MEDIANS[name]:.1f}x"
