"""The Redis keys of one shared fleet, by name, and stream entry ids as comparable pairs."""

from __future__ import annotations

from typing import NamedTuple

EntryKey = tuple[int, int]


class RedisKeys(NamedTuple):
    """The keys under ``registry.store.key_prefix``; their order is the scripts' ``KEYS[n]``
    (``rbee/queen/redis/lua.py``), so a script gets them all, as ``list(keys)``."""

    hives: str
    """A hash of each hive's last whole heartbeat (msgpack; JSON from older queens)."""
    seen: str
    """A sorted set of each hive's last heartbeat time (ms, Redis's clock)."""
    stale: str
    """The set of hives judged stale."""
    stream: str
    """The Redis Stream of events."""
    sweeper: str
    """The lease of the queen that sweeps."""
    first: str
    """A sorted set of the time each hive was first seen (ms)."""
    last: str
    """A hash of the id of each hive's newest heartbeat entry (whole or delta): the base the
    next delta entry names, so a mirror tells whether it holds what a delta applies to."""
    whole: str
    """A hash of the id of the entry each hive's record in ``hives`` comes from (its last whole
    heartbeat: a POST, or a channel's snapshot)."""

    @classmethod
    def under(cls, prefix: str) -> RedisKeys:
        return cls(*(f"{prefix}:{name}" for name in cls._fields))


def entry_key(entry_id: str) -> EntryKey | None:
    """A stream entry id (``ms-seq``) as a comparable pair; None if it is not one."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
