"""The base of every config section, and the sections kept beside ``rbee/config.py`` (which
holds every other one and imports these): the hive's ``collect.engine`` (the engine collector and
the fast engine poll, docs/engines.md). A section refuses unknown keys, so a typo is an error,
never a default."""

from __future__ import annotations

from typing import Annotated

import msgspec


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every config section."""


Seconds = Annotated[float, msgspec.Meta(gt=0)]


class EngineSettings(Settings):
    """The engine collector: each worker's own inference-engine metrics (Prometheus text)."""

    timeout_s: Seconds = 0.5
    """Deadline of one scrape (connect, send, read); a slower engine has no state that tick."""
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 2**20
    """Largest exposition read from one engine; a longer body is refused, not truncated."""
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 64
    """Scrapes in flight at once (and connections kept open) for the whole hive."""
    ttft_window_s: Seconds = 60.0
    """The window of the time-to-first-token percentiles (histogram bucket deltas)."""
    poll_interval_s: Annotated[float, msgspec.Meta(ge=0.005, le=60)] = 0.05
    """How often each local engine's scheduling figures (running, waiting, KV cache) are
    polled, from its cheap load endpoint where it has one (vLLM ``/load`` with
    ``--enable-server-load-tracking``, SGLang ``/v1/loads``, llama.cpp ``/slots``), else from
    ``/metrics`` reading only those families. A change is pushed to the queen at once (over the
    channel) and the full ``/metrics`` stays at ``interval_s``. 0.05 is llm-d's endpoint
    picker's floor; each poll is one GET on a kept-alive connection."""
    post_min_interval_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.25
    """Over POST (no channel), the shortest time between two heartbeats sent for engine
    changes: each POST carries the whole heartbeat, so changes are coalesced this long. Over
    the channel a change goes at once (at most one snapshot per poll round)."""
    resend_after_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.4
    """Over the channel, an engine state that did not change is sent again once the queen's copy
    is this old, so that its ``sampled_at`` shows the figures were confirmed (a pick treats figures
    older than ``pick.stale_after_ms``, 500 by default, as stale). 0: only changes are sent, and
    the heartbeat every ``heartbeat.interval_s`` refreshes them."""
