"""Taking one heartbeat into the fleet, whatever carried it (an HTTP POST, a hive's channel).

Both transports decode their bytes into a ``HiveHeartbeat`` and hand it here with the hive the
sender authenticated as; the checks, the goodbye, admission and the store write are the same for
both, so a heartbeat means one thing however it arrived.
"""

from __future__ import annotations

import math

from .._errors import AdmissionError, StoreError
from ..config import QueenConfig
from ..contract import ChannelDelta, HiveHeartbeat, OperationalStatus
from ..http.auth import ANY_HIVE
from ..http.errors import ApiError
from .store import BaseMissing, FleetStore, MemoryStore


async def stored(write):
    """A write to the store; 503 naming the problem when the store cannot take it (the hive
    retries, possibly at another queen)."""
    try:
        return await write
    except StoreError as exc:
        raise ApiError(503, f"the registry store is unavailable: {exc}") from exc


class Ingest:
    """The fleet's door for heartbeats: refusals are ``ApiError`` with the status a POST answers
    (the channel sends the same status and message in its error frame)."""

    def __init__(self, config: QueenConfig, store: FleetStore) -> None:
        self.config, self.store = config, store
        self._direct = store if isinstance(store, MemoryStore) else None
        """The store when it writes without waiting (``accept_now``)."""

    @property
    def synchronous(self) -> bool:
        """Whether ``accept_now`` can be used: the channel hub's condition."""
        return self._direct is not None

    async def accept(self, heartbeat: HiveHeartbeat, size: int, acting_as: str | None,
                     delta: ChannelDelta | None = None) -> str:
        """Store ``heartbeat`` (``size``: its encoded bytes) sent by ``acting_as`` (a hive id, or
        ``ANY_HIVE`` for the shared token); returns what the queen answers. ``delta``: the
        channel's frame that ``heartbeat`` was made from (a shared store sends only it on)."""
        store = self.store
        if self._goodbye(heartbeat, acting_as):
            await stored(store.remove(heartbeat.hive.id, "the hive stopped"))
            return _removed(heartbeat)
        try:
            await stored(store.ingest(heartbeat, size, delta))
        except (BaseMissing, AdmissionError) as exc:
            raise _refused(exc) from exc
        return _received(heartbeat)

    def accept_now(self, heartbeat: HiveHeartbeat, size: int, acting_as: str | None) -> str:
        """``accept`` on a store that writes without waiting (``synchronous``): the same
        checks, refusals and writes, for a caller that cannot wait (the channel hub). Such a
        store keeps whole heartbeats, so a channel's delta is not passed on."""
        store = self._direct
        if store is None:
            raise TypeError(f"accept_now: {type(self.store).__name__} writes with a wait")
        if self._goodbye(heartbeat, acting_as):
            store.remove_now(heartbeat.hive.id, "the hive stopped")
            return _removed(heartbeat)
        try:
            store.ingest_now(heartbeat, size)
        except AdmissionError as exc:
            raise _refused(exc) from exc
        return _received(heartbeat)

    def _goodbye(self, heartbeat: HiveHeartbeat, acting_as: str | None) -> bool:
        """ApiError for a heartbeat this caller may not send; whether it is its hive's goodbye
        (a stopped hive, whose workers are no longer watched by anyone: it is removed)."""
        if acting_as is not ANY_HIVE and heartbeat.hive.id != acting_as:
            raise ApiError(403, f"the credential of hive {acting_as!r} cannot post as hive "
                                f"{heartbeat.hive.id!r}")
        limit = self.config.registry.max_workers_per_hive
        if len(heartbeat.workers) > limit:
            raise ApiError(400, f"invalid heartbeat: {len(heartbeat.workers)} workers, more than "
                                f"registry.max_workers_per_hive ({limit}) - at `$.workers`")
        return heartbeat.hive.operational_status is OperationalStatus.STOPPED


def _refused(exc: BaseMissing | AdmissionError) -> ApiError:
    """What a POST answers when the store refuses a heartbeat: a delta without its base 409,
    admission 429 with Retry-After while hives arrive too fast, 503 when the registry is full."""
    if isinstance(exc, BaseMissing):
        return ApiError(409, str(exc))
    if exc.retry_after_s is None:
        return ApiError(503, str(exc))
    return ApiError(429, str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})


def _removed(heartbeat: HiveHeartbeat) -> str:
    return f"hive {heartbeat.hive.id!r} stopped: removed"


def _received(heartbeat: HiveHeartbeat) -> str:
    return f"heartbeat from hive {heartbeat.hive.id!r} with {len(heartbeat.workers)} workers received"
