"""Inference engines' own metrics: Prometheus text → one typed ``EngineState`` per worker.

Each engine publishes its scheduler state on its own HTTP port, under its own names. ``ENGINES``
maps those names onto ours; they are taken from each engine's source and documentation (the
fixtures in ``tests/engine_fixtures/`` say which file and version):

- vLLM: ``vllm/v1/metrics/loggers.py`` (V1) and ``vllm/engine/metrics.py`` (V0). KV-cache use is
  ``vllm:kv_cache_usage_perc`` since 0.9, ``vllm:gpu_cache_usage_perc`` before (both a 0..1
  fraction despite the name).
- SGLang: ``python/sglang/srt/metrics/collector.py``; ``token_usage`` is the KV pool's used share;
  preemptions are retractions (``num_retracted_requests_total``, newer releases only).
- TGI: ``docs/source/reference/metrics.md`` (router, metrics-exporter-prometheus: counters keep
  their name, no ``_total``); no KV-cache, preemption or time-to-first-token metric.
- llama.cpp server: ``tools/server`` ``/metrics`` (``--metrics``); builds before the unified KV
  cache print ``llamacpp:kv_cache_usage_ratio``, current ones do not.

None of them prints its version on ``/metrics``; each says it on an info endpoint of the same port
(vLLM ``GET /version``, SGLang ``GET /get_server_info``, TGI ``GET /info``: ``version``; llama.cpp
``GET /props``: ``build_info``), which the collector asks once per worker.

The text is parsed by prometheus-client's parser, which is pure Python (~30 µs a labelled line). So
two things are kept from it: only the lines that begin with a name we read are handed to it (not
comments, the process_* and python_* families, histograms we do not use: a vLLM exposition is ~440
lines of which ~30 matter), found with ``str.find``; and a series (a sample line's name and labels)
seen in the same worker's previous scrape is not parsed again, only its new value is read
(``ParsedSeries``): the series of an engine stay the same from one scrape to the next, their
values move.

Rates are counter deltas between two readings over their wall-clock distance; the TTFT percentiles
are read from the histogram buckets' deltas over ``ttft_window_s`` (as Prometheus'
``histogram_quantile`` over a ``rate`` does: linear within the bucket). A counter that goes
backwards (the engine restarted) is an ``EngineError``: that tick has no state, the next starts over.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from prometheus_client.parser import text_string_to_metric_families

from rbee._errors import CollectorError
from rbee.contract import MAX_FIGURE, EngineState


class EngineError(CollectorError):
    """The engine's metrics could not be read or make no sense; the message says why."""


@dataclass(frozen=True, slots=True)
class EngineNames:
    """Where one engine publishes each figure (sample names as printed)."""

    engine: str
    marker: str
    """A prefix only this engine's metric names have."""
    running: str
    waiting: str
    kv_cache: tuple[str, ...] = ()
    """0..1 gauges, the first one present wins."""
    prompt_tokens: str | None = None
    generation_tokens: str | None = None
    preemptions: str | None = None
    ttft_buckets: str | None = None
    version_path: str | None = None
    """The engine's own info endpoint (JSON) on the same port, and the key of its version."""
    version_key: str = "version"

    @property
    def wanted(self) -> tuple[str, ...]:
        names = (self.running, self.waiting, *self.kv_cache, self.prompt_tokens,
                 self.generation_tokens, self.preemptions, self.ttft_buckets)
        return tuple(name for name in names if name)

    def sample_lines(self, text: str) -> list[str]:
        """The lines of ``text`` that hold a sample of a wanted name. The text format keeps all
        lines of one metric together, so each name costs one ``str.find`` (C speed) to its
        group and a walk down the group, rather than splitting ~440 lines in Python."""
        text = "\n" + text
        lines = []
        for name in self.wanted:
            at = text.find("\n" + name)
            while at >= 0:
                end = text.find("\n", at + 1)
                line = text[at + 1:end] if end >= 0 else text[at + 1:]
                if line[len(name):len(name) + 1] not in ("{", " ", ""):  # a longer name
                    at = text.find("\n" + name, at + 1)
                    continue
                lines.append(line.rstrip("\r"))
                at = end if end >= 0 and text.startswith(name, end + 1) else -1
        return lines


ENGINES = (
    EngineNames(engine="vllm", marker="vllm:", running="vllm:num_requests_running",
                waiting="vllm:num_requests_waiting",
                kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                prompt_tokens="vllm:prompt_tokens_total",
                generation_tokens="vllm:generation_tokens_total",
                preemptions="vllm:num_preemptions_total",
                ttft_buckets="vllm:time_to_first_token_seconds_bucket", version_path="/version"),
    EngineNames(engine="sglang", marker="sglang:", running="sglang:num_running_reqs",
                waiting="sglang:num_queue_reqs", kv_cache=("sglang:token_usage",),
                prompt_tokens="sglang:prompt_tokens_total",
                generation_tokens="sglang:generation_tokens_total",
                preemptions="sglang:num_retracted_requests_total",
                ttft_buckets="sglang:time_to_first_token_seconds_bucket",
                version_path="/get_server_info"),
    EngineNames(engine="tgi", marker="tgi_", running="tgi_batch_current_size",
                waiting="tgi_queue_size", prompt_tokens="tgi_request_input_length_sum",
                generation_tokens="tgi_request_generated_tokens_sum", version_path="/info"),
    EngineNames(engine="llamacpp", marker="llamacpp:", running="llamacpp:requests_processing",
                waiting="llamacpp:requests_deferred", kv_cache=("llamacpp:kv_cache_usage_ratio",),
                prompt_tokens="llamacpp:prompt_tokens_total",
                generation_tokens="llamacpp:tokens_predicted_total", version_path="/props",
                version_key="build_info"),
)
ENGINE_NAMES = {names.engine: names for names in ENGINES}


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One scrape, as the engine printed it: gauges now, counters since the engine started."""

    engine: str
    taken_at: float
    running: int
    waiting: int
    kv_cache_fraction: float | None
    counters: dict[str, float]
    """prompt_tokens, generation_tokens, preemptions: those the engine publishes."""
    ttft_buckets: tuple[tuple[float, float], ...] | None
    """(upper bound, cumulative count), ascending, +Inf last; summed over label sets."""


def identify(text: str) -> EngineNames:
    for names in ENGINES:
        if names.marker in text:
            return names
    raise EngineError("no known engine metrics in the exposition (looked for "
                      + ", ".join(f"{n.marker}*" for n in ENGINES) + ")")


ParsedSeries = dict[str, tuple[str, dict[str, str]]]
"""One worker's last scrape: each series (the text of a sample line before its value) → the name
and labels prometheus_client parsed from it."""


def _parse_lines(lines: list[str], cache: ParsedSeries | None) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of each sample line, in order. prometheus_client's parser reads every
    line whose series was not in this worker's previous scrape; for a series it did read then,
    only the value is new, and it is read with ``float`` (the parser's own conversion). ``cache``
    is replaced by this scrape's series."""
    previous = cache if cache is not None else {}
    found: list[tuple[str, dict, float] | None] = []
    missing: list[int] = []
    for line in lines:
        series, _, value = line.rpartition(" ")
        known = previous.get(series)
        if known is not None:
            try:
                found.append((known[0], known[1], float(value)))
                continue
            except ValueError:
                pass  # let the parser say what is wrong with it
        missing.append(len(found))
        found.append(None)
    if missing:
        text = "\n".join(lines[index] for index in missing) + "\n"
        samples = [sample for family in text_string_to_metric_families(text)
                   for sample in family.samples]
        if len(samples) != len(missing):
            raise ValueError(f"{len(missing)} sample lines gave {len(samples)} samples")
        for index, sample in zip(missing, samples, strict=True):
            found[index] = (sample.name, sample.labels, sample.value)
    if cache is not None:
        cache.clear()
        for line, (name, labels, value) in zip(lines, found, strict=True):
            series, _, token = line.rpartition(" ")
            if series and float(token) == value:  # no timestamp: the last token is the value
                cache[series] = (name, labels)
    return found


def parse_exposition(text: str, taken_at: float, cache: ParsedSeries | None = None
                     ) -> EngineReading:
    """Read one engine's exposition. Raises EngineError naming what is missing or malformed.
    ``cache``: this worker's lines from its previous scrape (see module docstring)."""
    names = identify(text)
    values, buckets = _read_values(names, text, cache)
    kv = next((values[name] for name in names.kv_cache if name in values), None)
    counters = {field: values[name] for field, name in (
        ("prompt_tokens", names.prompt_tokens), ("generation_tokens", names.generation_tokens),
        ("preemptions", names.preemptions)) if name is not None and name in values}
    ttft = None
    if buckets:
        ttft = tuple(sorted(buckets.items()))
        if not math.isinf(ttft[-1][0]) or math.isnan(ttft[0][0]):
            raise EngineError(f"{names.ttft_buckets} has no +Inf bucket or a bad le label")
    return EngineReading(engine=names.engine, taken_at=taken_at, running=round(values[names.running]),
                         waiting=round(values[names.waiting]), kv_cache_fraction=kv,
                         counters=counters, ttft_buckets=ttft)


SCHEDULING = {names.engine: replace(names, prompt_tokens=None, generation_tokens=None,
                                    preemptions=None, ttft_buckets=None) for names in ENGINES}
"""Each engine's names of the scheduling figures alone, for the fast poll of ``/metrics``."""


def parse_scheduling(text: str, engine: str, cache: ParsedSeries | None = None
                     ) -> tuple[int, int, float | None]:
    """Running, waiting and the KV cache's used fraction from ``engine``'s exposition, reading
    only those families' lines (the fast poll of an engine with no load endpoint)."""
    names = SCHEDULING[engine]
    if names.marker not in text:
        raise EngineError(f"no {engine} metrics in the exposition (looked for {names.marker}*)")
    values, _ = _read_values(names, text, cache)
    kv = next((values[name] for name in names.kv_cache if name in values), None)
    return round(values[names.running]), round(values[names.waiting]), kv


def _read_values(names: EngineNames, text: str, cache: ParsedSeries | None
                 ) -> tuple[dict[str, float], dict[float, float]]:
    """The wanted samples of ``text``: label sets summed (the KV cache: their maximum), the
    TTFT buckets by bound. EngineError for a malformed line, a value that is not a finite
    non-negative number, or a missing running or waiting figure."""
    kept = names.sample_lines(text)
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    try:
        for name, labels, value in _parse_lines(kept, cache):
            if name == names.ttft_buckets:
                bound = float(labels.get("le", "nan"))
                buckets[bound] = buckets.get(bound, 0.0) + value
            elif name in names.kv_cache:  # the fullest engine of several (DP)
                values[name] = max(values.get(name, 0.0), value)
            else:  # several label sets (data-parallel engines, TP ranks): their sum
                values[name] = values.get(name, 0.0) + value
    except ValueError as exc:
        raise EngineError(f"malformed {names.engine} metrics: {exc}") from exc
    for value in values.values():
        if not math.isfinite(value) or not 0 <= value <= MAX_FIGURE:
            raise EngineError(f"{names.engine} metrics hold a value that is not a finite "
                              f"non-negative number within the contract's bound: {value!r}")
    for required in (names.running, names.waiting):
        if required not in values:
            raise EngineError(f"{names.engine} metrics lack {required}")
    return values, buckets


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: linear interpolation inside the bucket holding rank q·total."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


class EngineTracker:
    """One worker's readings over time: turns them into ``EngineState`` (rates, percentiles)."""

    def __init__(self, ttft_window_s: float = 60.0) -> None:
        self.window_s = ttft_window_s
        self.history: deque[EngineReading] = deque()

    def update(self, reading: EngineReading) -> EngineState:
        """The state as of ``reading``. Raises EngineError if a counter went backwards (the
        history then restarts from this reading)."""
        previous = self.history[-1] if self.history else None
        if previous is not None and previous.engine != reading.engine:
            previous = None
            self.history.clear()
        if previous is not None:
            for name, value in reading.counters.items():
                before = previous.counters.get(name)
                if before is not None and value < before:
                    self.history.clear()
                    self.history.append(reading)
                    raise EngineError(f"{reading.engine} counter {name} went backwards "
                                      f"({before:g} → {value:g}): engine restarted?")
        self.history.append(reading)
        while self.history[0].taken_at < reading.taken_at - self.window_s:
            self.history.popleft()
        state = EngineState(
            engine=reading.engine, requests_running=reading.running,
            requests_waiting=reading.waiting,
            kv_cache_pct=None if reading.kv_cache_fraction is None
            else round(reading.kv_cache_fraction * 100, 2))
        if previous is not None and reading.taken_at > previous.taken_at:
            seconds = reading.taken_at - previous.taken_at
            rates = {name: round((value - previous.counters[name]) / seconds, 2)
                     for name, value in reading.counters.items() if name in previous.counters}
            state.prompt_tokens_s = rates.get("prompt_tokens")
            state.generation_tokens_s = rates.get("generation_tokens")
            state.preemptions_s = rates.get("preemptions")
            state.rate_window_s = round(seconds, 3)
        oldest = self.history[0]
        if reading.ttft_buckets and oldest is not reading and oldest.ttft_buckets:
            before = dict(oldest.ttft_buckets)
            delta = [(bound, count - before.get(bound, 0.0))
                     for bound, count in reading.ttft_buckets]
            if any(count < 0 for _, count in delta):
                self.history.clear()
                self.history.append(reading)
                raise EngineError(f"{reading.engine} time-to-first-token histogram went "
                                  "backwards: engine restarted?")
            p50, p95 = _quantile(0.5, delta), _quantile(0.95, delta)
            state.ttft_p50_s = None if p50 is None else round(p50, 4)
            state.ttft_p95_s = None if p95 is None else round(p95, 4)
        return state
