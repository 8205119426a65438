"""The query parameters of the queen's reads, decoded into msgspec structs.

Each endpoint's parameters are one struct: its fields are the parameters it knows (an unknown
one is refused, naming those it knows, in the struct's field order), and each field's type says
how its text is read, in rbee's words: ``bool`` (true/false, 1/0, yes/no), a number ``>= 0`` and
finite, or text. What depends on the config (a page's ``limit``) is checked by the handler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import msgspec

from ..http.errors import ApiError


class HivesQuery(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /v1/hives``."""

    limit: str | None = None
    after: str | None = None


class WorkersQuery(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /v1/workers``: the filters, then the page."""

    idle: bool = False
    model: str | None = None
    min_free_vram_mb: float | None = None
    max_waiting: float | None = None
    """A whole number (checked by ``whole``): read as a number first, for the same words."""
    max_kv_cache_pct: float | None = None
    limit: str | None = None
    after: str | None = None


class HistoryQuery(msgspec.Struct, kw_only=True, frozen=True):
    """``GET /v1/history`` (fields in sorted order: the order its refusals name them)."""

    gpu: str | None = None
    group: str | None = None
    hive: str | None = None
    instance: str | None = None
    metric: str | None = None
    since: float | None = None
    step: float | None = None


Q = TypeVar("Q", bound=msgspec.Struct)


def decode_query(params: Mapping[str, str], kind: type[Q]) -> Q:
    """``params`` as a ``kind``; 400 naming the first parameter that cannot be read."""
    known = kind.__struct_fields__
    unknown = set(params) - set(known)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(known)}")
    readers = _readers(kind)
    return kind(**{name: readers[name](name, params[name]) for name in known if name in params})


def whole(name: str, value: float | None, text: str | None) -> int | None:
    """A number parameter that must be whole (``max_waiting``)."""
    if value is None:
        return None
    if not value.is_integer():
        raise ApiError(400, f"query parameter {name!r} must be a whole number, not {text!r}")
    return int(value)


def _boolean(name: str, text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, f"query parameter {name!r} must be true or false, not {value!r}")


def _number(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r} must be a number, not {text!r}") from None
    if not number >= 0:  # also refuses nan
        raise ApiError(400, f"query parameter {name!r} must be >= 0, not {text!r}")
    if number == math.inf:  # a finite number only: infinity overflows what is computed from it
        raise ApiError(400, f"query parameter {name!r} must be a finite number, not {text!r}")
    return number


def _text(name: str, text: str) -> str:
    return text


_BY_TYPE: dict[type, Callable[[str, str], object]] = {
    msgspec.inspect.BoolType: _boolean,
    msgspec.inspect.FloatType: _number,
    msgspec.inspect.StrType: _text,
}
_readers_of: dict[type, dict[str, Callable[[str, str], object]]] = {}


def _readers(kind: type[msgspec.Struct]) -> dict[str, Callable[[str, str], object]]:
    """Each field's reader, from its type (``X | None`` reads as ``X``)."""
    readers = _readers_of.get(kind)
    if readers is None:
        readers = {}
        for field in msgspec.inspect.type_info(kind).fields:
            kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) \
                else (field.type,)
            (read,) = {_BY_TYPE[type(t)] for t in kinds if not isinstance(t, msgspec.inspect.NoneType)}
            readers[field.name] = read
        readers = _readers_of.setdefault(kind, readers)
    return readers
