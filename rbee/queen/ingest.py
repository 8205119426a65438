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
from .store import BaseMissing, FleetStore


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

    async def accept(self, heartbeat: HiveHeartbeat, size: int, acting_as: str | None,
                     delta: ChannelDelta | None = None) -> str:
        """Store ``heartbeat`` (``size``: its encoded bytes) sent by ``acting_as`` (a hive id, or
        ``ANY_HIVE`` for the shared token); returns what the queen answers. ``delta``: the
        channel's frame that ``heartbeat`` was made from (a shared store sends only it on)."""
        config, store = self.config, self.store
        if acting_as is not ANY_HIVE and heartbeat.hive.id != acting_as:
            raise ApiError(403, f"the credential of hive {acting_as!r} cannot post as hive "
                                f"{heartbeat.hive.id!r}")
        if len(heartbeat.workers) > config.registry.max_workers_per_hive:
            raise ApiError(400, f"invalid heartbeat: {len(heartbeat.workers)} workers, more than "
                                f"registry.max_workers_per_hive "
                                f"({config.registry.max_workers_per_hive}) - at `$.workers`")
        if heartbeat.hive.operational_status is OperationalStatus.STOPPED:
            # a hive's goodbye: its workers are no longer watched by anyone
            await stored(store.remove(heartbeat.hive.id, "the hive stopped"))
            return f"hive {heartbeat.hive.id!r} stopped: removed"
        try:
            await stored(store.ingest(heartbeat, size, delta))
        except BaseMissing as exc:
            raise ApiError(409, str(exc)) from exc
        except AdmissionError as exc:
            if exc.retry_after_s is None:
                raise ApiError(503, str(exc)) from exc
            raise ApiError(429, str(exc), headers={
                "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from exc
        return (f"heartbeat from hive {heartbeat.hive.id!r} with "
                f"{len(heartbeat.workers)} workers received")
