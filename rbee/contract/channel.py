"""The hive's channel: binary frames (msgpack) on one long-lived WebSocket from a hive to its queen.

A heartbeat over POST is the hive's whole state every second; over the channel the hive sends its
whole state once (``Snapshot``) and then only what changed (``Delta``), and the queen rebuilds the
whole ``HiveHeartbeat`` from its last one (``apply_delta``) and takes it exactly as a POST's. So
every figure the queen keeps after a delta is the one a POST of the full heartbeat gives.

Sequence numbers: every frame a hive sends carries the next ``seq``. A delta applies only to the
state of the frame just before it (``seq - 1``) as the queen took it; when that frame was refused
or never seen, the queen answers ``Resync`` and the hive sends a snapshot. The queen answers every
frame with exactly one ``Ack``, ``Resync`` or ``ChannelError``, so a hive can bound the frames it
has sent and not yet heard about (backpressure): a hive that is behind sends its newest state,
never a queue.

Keys: a worker is known by ``(group, instance)`` (unique on its hive), a GPU by its ``uuid``
(unique; ``index`` is not, since a GPU in MIG mode is reported as its instances, which share
their parent's index). Deltas keep the order of the full lists: changed items stay in place, new
ones are appended, removed ones dropped (a hive whose order changed otherwise sends a snapshot).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .._errors import ContractError
from .bounds import MAX_GPUS, MAX_WORKERS, LongText, NonNegFloat, ShortText, UtcTimestamp, WorkerName
from .codec import _checked
from .messages import GpuDevice, HiveHeartbeat, HiveInfo, WorkerTelemetry

_Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_WorkerKey = tuple[WorkerName, WorkerName]
"""A worker on its hive: (group, instance)."""


class ChannelSnapshot(msgspec.Struct, tag_field="type", tag="snapshot", kw_only=True, gc=False):
    """The hive's whole state: sent first on a channel, every ``channel.snapshot_every_s``, and
    whenever the queen asks (``Resync``, ``ChannelError``)."""

    seq: _Seq
    heartbeat: HiveHeartbeat


class ChannelDelta(msgspec.Struct, tag_field="type", tag="delta", kw_only=True, omit_defaults=True,
            gc=False):
    """What changed since the frame ``seq - 1``: the timestamp always, the hive's info when it
    changed, the workers and GPUs that changed or are new (whole), and those that are gone."""

    seq: _Seq
    timestamp: UtcTimestamp
    hive: HiveInfo | None = None
    workers: Annotated[list[WorkerTelemetry], msgspec.Meta(max_length=MAX_WORKERS)] = []
    gone: Annotated[list[_WorkerKey], msgspec.Meta(max_length=MAX_WORKERS)] = []
    gpus: Annotated[list[GpuDevice], msgspec.Meta(max_length=MAX_GPUS)] = []
    gpus_gone: Annotated[list[ShortText], msgspec.Meta(max_length=MAX_GPUS)] = []
    """The ``uuid`` of each GPU no longer reported."""


HiveFrame = ChannelSnapshot | ChannelDelta
"""What a hive sends on its channel."""


class ChannelAck(msgspec.Struct, tag_field="type", tag="ack", gc=False):
    """The frame ``seq`` was taken: the queen's registry holds it."""

    seq: _Seq


class ChannelResync(msgspec.Struct, tag_field="type", tag="resync", gc=False):
    """The delta ``seq`` was not applied (the queen does not hold the state it follows): send a
    snapshot."""

    seq: _Seq
    reason: LongText


class ChannelError(msgspec.Struct, tag_field="type", tag="error", kw_only=True, omit_defaults=True,
                   gc=False):
    """The frame ``seq`` (None: a frame that could not be read) was refused, with the status and
    message a POST of it would have got. The channel stays open; the hive's next frame is a
    snapshot. ``retry_after_s``: the queen is busy (429/503), send nothing before then."""

    seq: _Seq | None = None
    status: int
    message: LongText
    retry_after_s: NonNegFloat | None = None


QueenFrame = ChannelAck | ChannelResync | ChannelError
"""What the queen answers on a channel."""

_encoder = msgspec.msgpack.Encoder()
_hive_frames = msgspec.msgpack.Decoder(HiveFrame)
_queen_frames = msgspec.msgpack.Decoder(QueenFrame)


def encode_frame(frame: HiveFrame | QueenFrame) -> bytes:
    return _encoder.encode(frame)


def _decoded(decoder: msgspec.msgpack.Decoder, payload: bytes, what: str):
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ContractError(f"invalid {what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ContractError(f"invalid {what}: not a msgpack frame ({exc})") from exc
    except RecursionError as exc:
        raise ContractError(f"invalid {what}: nested too deeply") from exc


def decode_hive_frame(payload: bytes) -> HiveFrame:
    """A frame from a hive; ContractError naming the problem (and the field) otherwise. A
    snapshot's heartbeat gets the checks of a POSTed one (``decode_heartbeat``)."""
    frame = _decoded(_hive_frames, payload, "channel frame")
    if type(frame) is ChannelSnapshot:
        _checked(frame.heartbeat)
    return frame


def decode_queen_frame(payload: bytes) -> QueenFrame:
    """A frame from the queen; ContractError naming the problem otherwise."""
    return _decoded(_queen_frames, payload, "queen's channel frame")


def worker_key(worker: WorkerTelemetry) -> _WorkerKey:
    return (worker.group, worker.instance)


def apply_delta(base: HiveHeartbeat, delta: ChannelDelta) -> HiveHeartbeat:
    """The whole heartbeat ``delta`` makes of ``base`` (which is left as it is), checked as a
    POSTed one is. Raises ContractError for a delta that names a worker or GPU the base does
    not hold as gone, or that makes a list longer than the contract allows."""
    workers = base.workers
    if delta.workers or delta.gone:
        by_key = {worker_key(w): w for w in workers}
        for key in delta.gone:
            if by_key.pop(tuple(key), None) is None:
                raise ContractError(f"invalid delta: worker {'/'.join(key)!r} is gone but was "
                                    f"not there - at `$.gone`")
        for worker in delta.workers:
            by_key[worker_key(worker)] = worker
        workers = list(by_key.values())
        if len(workers) > MAX_WORKERS:
            raise ContractError(f"invalid delta: {len(workers)} workers, more than {MAX_WORKERS}")
    gpus = base.capabilities
    if delta.gpus or delta.gpus_gone:
        by_uuid = {gpu.uuid: gpu for gpu in gpus}
        for uuid in delta.gpus_gone:
            if by_uuid.pop(uuid, None) is None:
                raise ContractError(f"invalid delta: GPU {uuid!r} is gone but was not there "
                                    f"- at `$.gpus_gone`")
        for gpu in delta.gpus:
            by_uuid[gpu.uuid] = gpu
        gpus = list(by_uuid.values())
        if len(gpus) > MAX_GPUS:
            raise ContractError(f"invalid delta: {len(gpus)} GPUs, more than {MAX_GPUS}")
    if delta.hive is not None and delta.hive.id != base.hive.id:
        raise ContractError(f"invalid delta: hive {delta.hive.id!r} on the channel of hive "
                            f"{base.hive.id!r} (a channel carries one hive) - at `$.hive.id`")
    heartbeat = msgspec.structs.replace(base, hive=delta.hive or base.hive,
                                        timestamp=delta.timestamp, workers=workers,
                                        capabilities=gpus)
    if delta.workers:
        _checked(msgspec.structs.replace(heartbeat, workers=delta.workers))
    return heartbeat
