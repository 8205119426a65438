"""The base of every config section, and the sections kept beside ``rbee/config.py`` (which
holds every other one and imports these): the hive's ``collect.engine`` (the engine collector and
the fast engine poll, docs/engines.md), the queen's ``pick`` (``GET /v1/pick``, docs/pick.md) and
its ``history`` (``GET /v1/history``, docs/history.md).
A section refuses unknown keys, so a typo is an error, never a default."""

from __future__ import annotations

from typing import Annotated, Literal

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


HISTORY_WORKER_METRICS = ("cpu_pct", "rss_mb", "io_r_mb_s", "io_w_mb_s", "gpu_util_pct", "vram_mb",
                          "engine_running", "engine_waiting", "kv_cache_pct")
"""A worker's figures history can keep, in the order of its rows."""
HISTORY_GPU_METRICS = ("util_pct", "mem_util_pct", "vram_used_mb", "temperature_c", "power_w")


class HistorySettings(Settings):
    """The queen's built-in history (``GET /v1/history``), in memory: it starts empty. The
    defaults hold a fleet of 10,000 eight-GPU hives in ``max_bytes`` (docs/history.md)."""

    fine_step_s: Seconds = 5.0
    """Step of the fine tier: each series keeps its latest figure once per step."""
    fine_retention_s: Seconds = 300.0
    """How far back the fine tier reaches (5 minutes)."""
    coarse_step_s: Seconds = 300.0
    """Step of the coarse tier (averages of the fine one)."""
    coarse_retention_s: Seconds = 21600.0
    """How far back the coarse tier reaches (6 hours)."""
    worker_metrics: list[str] = msgspec.field(default_factory=lambda: [
        "cpu_pct", "rss_mb", "gpu_util_pct", "vram_mb", "engine_waiting", "kv_cache_pct"])
    """A worker's figures kept (those the dashboard, rbee top and rbee workers read)."""
    gpu_metrics: list[str] = msgspec.field(default_factory=list)
    """A GPU's figures kept (none by default: no built-in view reads them)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=2**20)] = 128 * 2**20
    """Memory for history: 267 bytes a series at the default tiers; past it, none new
    (docs/history.md)."""
    max_series_per_query: Annotated[int, msgspec.Meta(ge=1)] = 5000
    """A query naming more series (held, known or not) is refused (400) naming this key."""

    def __post_init__(self) -> None:
        n = self.coarse_step_s / self.fine_step_s  # a coarse point is the mean of n fine ones
        if n < 1 or abs(n - round(n)) > 1e-6 or self.coarse_retention_s < self.fine_retention_s:
            raise ValueError("the coarse tier must be at least as long as the fine one, its step a "
                             "whole multiple of the fine one")
        for key, known in (("worker_metrics", HISTORY_WORKER_METRICS),
                           ("gpu_metrics", HISTORY_GPU_METRICS)):
            names = getattr(self, key)
            unknown = [name for name in names if name not in known]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"history.{key}: {', '.join(unknown) or 'a metric named twice'}"
                                 f" in {names}; known: {', '.join(known)}")


class GcSettings(Settings):
    """The queen's cyclic garbage collection (``rbee/queen/gcpace.py``): what it holds is
    frozen out of Python's automatic collections every ``freeze_every_s``, and walked whole
    every ``full_every_s``, so no collection stalls heartbeats every few seconds by walking the
    whole fleet."""

    freeze_every_s: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.1
    """How often what exists is frozen; an automatic collection then walks at most this
    interval's survivors. 0: Python's collector as it runs by itself (at 3,200 eight-GPU hives,
    a 67-120 ms stall every few seconds; docs/scale.md)."""
    full_every_s: Annotated[float, msgspec.Meta(ge=1)] = 600.0
    """How often everything is walked for garbage cycles (which reference counting cannot
    free, and which wait for it). It holds the loop: ~0.3 s at 3,200 hives (docs/scale.md)."""
