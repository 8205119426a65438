"""The base of every config section, and the sections kept beside ``rbee/config.py`` (which
holds every other one and imports these): queen.yaml's ``pick:`` (``GET /v1/pick``,
docs/pick.md). A section refuses unknown keys, so a typo is an error, never a default."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config section."""


Millis = Annotated[float, msgspec.Meta(gt=0)]
Weight = Annotated[float, msgspec.Meta(ge=0)]


class PickWeights(Settings):
    """What each figure adds to a worker's pick score (lower is better; docs/pick.md)."""

    waiting: Weight = 1.0
    """Per request queued in the engine (``requests_waiting``): a new request waits behind it."""
    running: Weight = 0.5
    """Per request the engine is running (``requests_running``): they share its batch."""
    in_flight: Weight = 1.0
    """Per pick not yet seen in the engine's own counters (it is on its way to the queue)."""
    kv_cache: Weight = 4.0
    """Times the share of the KV cache in use (0..1): a full cache preempts requests."""
    degraded_gpu: Weight = 2.0
    """Once if a GPU of the worker is degraded (or unhealthy, with skip_unhealthy_gpus off)."""


class PickSettings(Settings):
    """``GET /v1/pick``: the best workers of a model for the next request (docs/pick.md)."""

    weights: PickWeights = msgspec.field(default_factory=PickWeights)
    stale_after_ms: Millis = 500.0
    """Figures older than this are stale (age from ``engine.sampled_at``, else the receipt)."""
    stale: Literal["saturate", "skip"] = "saturate"
    """A stale worker is ranked after every fresh one (``saturate``), or left out (``skip``)."""
    all_stale: Literal["fail_open", "unavailable"] = "fail_open"
    """When every candidate is stale: answer the best of them anyway (``fail_open``, flagged), or
    503 naming why (``unavailable``)."""
    in_flight_ttl_ms: Millis = 2000.0
    """A pick counts on its worker until the engine's counters rise for it, at most this long."""
    max_n: Annotated[int, msgspec.Meta(ge=1)] = 100
    """The largest ``n`` a pick may ask for."""
