"""The engines' cheap load endpoints, read by the hive's fast poll (``rbee.hive.engine_poll``).

A vLLM ``/metrics`` render runs prometheus-client over every family of the API server (~440
lines, histograms included) inside the engine's own process; polling it 20 times a second costs
the engine that much CPU. Where an engine answers its load in a few bytes, the fast poll asks that
instead and leaves the full ``/metrics`` to the heartbeat rate (``collectors.engine``):

- vLLM ``GET /load`` -> ``{"server_load": N}``: the requests in flight in its API server
  (``vllm/entrypoints/openai/api_server.py``), counted only with ``--enable-server-load-tracking``
  (without it the endpoint answers 0 forever), so it is used only when the worker's command line
  holds that flag.
- SGLang ``GET /v1/loads?include=core`` (``/get_load`` before): one entry per data-parallel rank,
  ``num_running_reqs``, ``num_waiting_reqs``, ``token_usage`` (``GetLoadsReqOutput`` in
  ``sglang/srt/managers/io_struct.py``); the answer is a list, or ``{"loads": [...]}``.
- llama.cpp ``GET /slots`` (on unless ``--no-slots``): one object per slot with ``is_processing``
  (``tools/server/server-context.cpp``); it says nothing of the deferred queue, so ``waiting``
  keeps the last full reading.
- TGI has none: its fast poll reads ``/metrics`` parsing only the scheduling families.

An engine without the endpoint (404, 501: an older release, the flag off) falls back to the
``/metrics`` fast path for that worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from rbee.contract import MAX_FIGURE, EngineState

from .engines import ENGINE_NAMES, EngineError, parse_scheduling

VLLM_LOAD_FLAG = "--enable-server-load-tracking"


@dataclass(frozen=True, slots=True)
class LoadReading:
    """What one fast poll read: None where the endpoint does not say."""

    running: int | None = None
    waiting: int | None = None
    in_flight: int | None = None
    """vLLM's count of requests in its API server: running and waiting together."""
    kv_cache_fraction: float | None = None

    def apply(self, state: EngineState) -> EngineState:
        """``state`` (the last full reading, with its rates) with these figures in it. An
        in-flight count moves the split of the last full reading: a rise is queued requests
        (the engine's free slots are not known until the next full reading), a fall leaves
        the queue first (a finished request lets a queued one in)."""
        running, waiting = state.requests_running, state.requests_waiting
        if self.in_flight is not None:
            running = min(running, self.in_flight)
            waiting = self.in_flight - running
        running = running if self.running is None else self.running
        waiting = waiting if self.waiting is None else self.waiting
        kv = state.kv_cache_pct if self.kv_cache_fraction is None \
            else round(self.kv_cache_fraction * 100, 2)
        return msgspec.structs.replace(state, requests_running=running,
                                       requests_waiting=waiting, kv_cache_pct=kv)


class _VllmLoad(msgspec.Struct):
    server_load: int


class _SglangRank(msgspec.Struct):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    token_usage: float | None = None


class _SglangLoads(msgspec.Struct):
    loads: list[_SglangRank]


class _LlamaSlot(msgspec.Struct):
    is_processing: bool


def _decode(body: bytes, kind: type, what: str):
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise EngineError(f"{what} is not what the engine answers: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EngineError(f"{what} is not JSON: {exc}") from None


def _count(value: int, what: str) -> int:
    if value < 0:
        raise EngineError(f"{what} is negative ({value})")
    if value > MAX_FIGURE:  # past the contract's bound the queen would refuse the heartbeat
        raise EngineError(f"{what} is {value}, past any real engine's count")
    return value


def parse_vllm_load(body: bytes) -> LoadReading:
    load = _decode(body, _VllmLoad, "vLLM /load")
    return LoadReading(in_flight=_count(load.server_load, "vLLM /load server_load"))


def parse_sglang_loads(body: bytes) -> LoadReading:
    ranks = _decode(body, _SglangLoads | list[_SglangRank], "SGLang /v1/loads")
    ranks = ranks.loads if isinstance(ranks, _SglangLoads) else ranks
    if not ranks:
        raise EngineError("SGLang /v1/loads lists no data-parallel rank")
    usage = [r.token_usage for r in ranks if r.token_usage is not None]
    if any(not 0 <= u <= 1.5 for u in usage):
        raise EngineError(f"SGLang /v1/loads token_usage out of range: {usage}")
    return LoadReading(
        running=sum(_count(r.num_running_reqs, "num_running_reqs") for r in ranks),
        waiting=sum(_count(r.num_waiting_reqs, "num_waiting_reqs") for r in ranks),
        kv_cache_fraction=max(usage) if usage else None)


def parse_llamacpp_slots(body: bytes) -> LoadReading:
    slots = _decode(body, list[_LlamaSlot], "llama.cpp /slots")
    return LoadReading(running=sum(slot.is_processing for slot in slots))


@dataclass(frozen=True, slots=True)
class FastPath:
    """Where and how one worker's engine is polled fast."""

    path: str
    read: Callable[[bytes, dict], LoadReading]
    """The body, and the worker's own cache (series already parsed), into a reading."""
    load_endpoint: bool = True
    """False: the fast path is ``/metrics`` itself (no cheap endpoint)."""


def _json(parse: Callable[[bytes], LoadReading]) -> Callable[[bytes, dict], LoadReading]:
    return lambda body, _cache: parse(body)


def _metrics_reader(engine: str) -> Callable[[bytes, dict], LoadReading]:
    def read(body: bytes, cache: dict) -> LoadReading:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EngineError(f"metrics are not UTF-8 text: {exc}") from exc
        running, waiting, kv = parse_scheduling(text, engine, cache)
        return LoadReading(running=running, waiting=waiting, kv_cache_fraction=kv)
    return read


LOAD_ENDPOINTS = {
    "vllm": FastPath("/load", _json(parse_vllm_load)),
    "sglang": FastPath("/v1/loads?include=core", _json(parse_sglang_loads)),
    "llamacpp": FastPath("/slots", _json(parse_llamacpp_slots)),
}


def fast_path(engine: str, metrics_path: str, argv: Sequence[str]) -> FastPath:
    """The fast path for a worker whose ``/metrics`` (at ``metrics_path``) named ``engine``."""
    cheap = LOAD_ENDPOINTS.get(engine)
    if cheap is not None and (engine != "vllm" or VLLM_LOAD_FLAG in argv):
        return cheap
    return metrics_path_for(engine, metrics_path)


def metrics_path_for(engine: str, metrics_path: str) -> FastPath:
    """The ``/metrics`` fast path: the scheduling families only."""
    if engine not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {engine!r}")
    return FastPath(metrics_path, _metrics_reader(engine), load_endpoint=False)
