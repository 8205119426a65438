"""JSON in and out of the contract: one encoder, and decoders whose every failure is a
ContractError in rbee's words, naming the field."""

from __future__ import annotations

import re
from operator import attrgetter
from typing import TypeVar

import msgspec

from .._errors import ContractError
from .bounds import ID_MAX_CHARS, ID_PATTERN, MIB
from .events import StreamEvent
from .messages import HiveHeartbeat, WorkerTelemetry
from .replies import Reply

_heartbeat_decoder = msgspec.json.Decoder(HiveHeartbeat)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of any contract struct."""
    return _encoder.encode(message)


_stream_event_decoder = msgspec.json.Decoder(StreamEvent)

T = TypeVar("T")


def decode_json(decoder: msgspec.json.Decoder[T], payload: bytes | str, what: str) -> T:
    """Decode ``payload`` with ``decoder``; every way the input can be wrong is a ContractError
    naming the problem (and the field, where there is one) in rbee's words, never another
    exception. The boundary maps the decoder's errors as httpx's ``map_exceptions`` does, so
    the words do not change with the decoder's release: invalid UTF-8 is a ``UnicodeDecodeError``
    up to msgspec 0.22 and a ``DecodeError("Invalid UTF-8 encoded string")`` from 0.23 on, and
    deep nesting is a RecursionError."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ContractError(f"invalid {what}: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"invalid {what}: {_not_utf8(payload) or exc}") from exc
    except RecursionError as exc:
        raise ContractError(f"invalid {what}: JSON nested too deeply") from exc


def _not_utf8(payload: bytes | str) -> str:
    """What is wrong if ``payload`` is not UTF-8 (JSON text must be), else "". Asked only once
    the decoder has failed, so a valid payload is never scanned twice."""
    if isinstance(payload, str):
        return ""
    try:
        bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        return f"not valid UTF-8 (byte {bad!r} at offset {exc.start})"
    return ""


def decode_stream_event(payload: bytes | str) -> StreamEvent:
    """Parse the data of one stream event. Raises ContractError naming the offending field."""
    return decode_json(_stream_event_decoder, payload, "stream event")


def decode_heartbeat(payload: bytes | str) -> HiveHeartbeat:
    """Parse and validate a heartbeat. Raises ContractError naming the offending field.

    Beyond what the types check: group and instance names match ``ID_PATTERN``, and the
    original's whole-number fields sent as floats (older hives) are rounded (``rss_bytes`` gets
    the finer figure), so what the queen stores and streams is integers."""
    return _checked(decode_json(_heartbeat_decoder, payload, "heartbeat"))


def _checked(heartbeat: HiveHeartbeat) -> HiveHeartbeat:
    """``heartbeat`` once its names are checked and its whole-number fields rounded (in place),
    whatever carried it (JSON, or the channel's msgpack: ``rbee/contract/channel.py``)."""
    workers = heartbeat.workers
    # C-level passes over the list (a Python loop would cost as much as the decoding): the names
    # against those already seen, and one sum per field, which is a float if any value is.
    if not (_known_names.issuperset(map(_group, workers))
            and _known_names.issuperset(map(_instance, workers))):
        for index, worker in enumerate(workers):
            _check_names(worker, index)
    if any(type(sum(map(field, workers))) is float for field in _whole_mib):
        for worker in workers:
            if type(worker.rss_mb) is float and not worker.rss_bytes:
                worker.rss_bytes = round(worker.rss_mb * MIB)
            worker.rss_mb = round(worker.rss_mb)
            worker.vram_mb = round(worker.vram_mb)
            worker.total_vram_mb = round(worker.total_vram_mb)
    return heartbeat


_group = attrgetter("group")
_instance = attrgetter("instance")
_whole_mib = (attrgetter("rss_mb"), attrgetter("vram_mb"), attrgetter("total_vram_mb"))
_id_pattern = re.compile(ID_PATTERN)
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 65536


def _check_names(worker: WorkerTelemetry, index: int) -> None:
    for field in ("group", "instance"):
        name = getattr(worker, field)
        if name not in _known_names and not _id_pattern.match(name):
            raise ContractError(
                f"invalid heartbeat: {name!r} is not a group or instance name: 1-{ID_MAX_CHARS} "
                f"characters of [A-Za-z0-9_.-], the first a letter or digit - at "
                f"`$.workers[{index}].{field}`")
    if len(_known_names) >= _KNOWN_NAMES_MAX:
        _known_names.clear()
    _known_names.update((worker.group, worker.instance))


_reply_decoder = msgspec.json.Decoder(Reply)


def reply_message(content: bytes) -> str | None:
    """The message of a JSON reply (an error's reason), or None when the body is not one: what a
    client of ours shows when a server refuses it, whatever that server sent."""
    try:
        return decode_json(_reply_decoder, content, "reply").message
    except ContractError:
        return None
