"""A simulated vLLM engine for the demo worker: requests arrive, queue, run, fill the KV cache and
are preempted when it is full, and every figure is published under vLLM's own metric names
(those of ``vllm/v1/metrics/loggers.py``) with prometheus-client, on the worker's own port, as a
real ``vllm serve`` does. The engine collector reads it exactly as it reads vLLM.

Real requests join the simulated ones: the port also answers OpenAI-style completions
(``rbee.demo.serving``), each one a request of this scheduler, so it waits for a slot, runs,
and streams the tokens the scheduler generates for it, and the queue a router sees moves with
the load it sends.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LABELS = ("model_name", "engine")


@dataclass
class Request:
    prompt_tokens: int
    target_tokens: int
    arrived_at: float
    generated: int = 0
    first_token_at: float | None = None
    real: bool = False
    """A request someone sent (``rbee.demo.serving``), not one of the simulated arrivals."""
    done: bool = False


class SimulatedEngine:
    """The scheduler of a small engine: ``max_running`` slots, a KV cache of ``kv_tokens``,
    ``tokens_per_s`` generated a second in all, at most ``request_tokens_per_s`` for one request
    (a batch decodes in parallel; one sequence is bound by its forward pass)."""

    def __init__(self, model: str, max_running: int = 8, kv_tokens: int = 16384,
                 tokens_per_s: float = 400.0, seed: int | None = None,
                 request_tokens_per_s: float = 60.0) -> None:
        self.random = random.Random(seed)
        self.max_running, self.kv_tokens, self.tokens_per_s = max_running, kv_tokens, tokens_per_s
        self.request_tokens_per_s = request_tokens_per_s
        self.model = model
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.changed = threading.Condition()
        """Held while the scheduler steps; notified after each step (the HTTP threads wait)."""
        self.registry = CollectorRegistry()
        labels = (model, "0")

        def gauge(name: str, doc: str):
            return Gauge(name, doc, LABELS, registry=self.registry).labels(*labels)

        def counter(name: str, doc: str):
            return Counter(name, doc, LABELS, registry=self.registry).labels(*labels)

        self.m_running = gauge("vllm:num_requests_running",
                               "Number of requests in model execution batches.")
        self.m_waiting = gauge("vllm:num_requests_waiting",
                               "Number of requests waiting to be processed.")
        self.m_kv = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.m_prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.m_generation = counter("vllm:generation_tokens",
                                    "Number of generation tokens processed.")
        self.m_preemptions = counter("vllm:num_preemptions",
                                     "Cumulative number of preemption from the engine.")
        self.m_ttft = Histogram("vllm:time_to_first_token_seconds",
                                "Histogram of time to first token in seconds.", LABELS,
                                buckets=TTFT_BUCKETS, registry=self.registry).labels(*labels)

    def submit(self, prompt_tokens: int, max_tokens: int, now: float) -> Request:
        """A real request, queued as vLLM queues one: it runs when a slot and KV cache free."""
        request = Request(prompt_tokens, max_tokens, now, real=True)
        with self.changed:
            self.waiting.append(request)
            self.m_waiting.set(len(self.waiting))
        return request

    def abort(self, request: Request) -> None:
        """The client went away: the request leaves the engine."""
        with self.changed:
            for queue in (self.running, self.waiting):
                if request in queue:
                    queue.remove(request)
            request.done = True

    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    def kv_used(self) -> int:
        return sum(r.prompt_tokens + r.generated for r in self.running)

    def step(self, now: float, seconds: float, arrivals_per_s: float) -> None:
        """Advance the engine by ``seconds``: arrivals, admission, generation, preemption."""
        with self.changed:
            self._step(now, seconds, arrivals_per_s)
            self.changed.notify_all()

    def _step(self, now: float, seconds: float, arrivals_per_s: float) -> None:
        for _ in range(self._poisson(arrivals_per_s * seconds)):
            self.waiting.append(Request(self.random.randint(64, 1024),
                                        self.random.randint(32, 512), now))
        while self.waiting and len(self.running) < self.max_running and (
                self.kv_used() + self.waiting[0].prompt_tokens <= self.kv_tokens):
            request = self.waiting.pop(0)
            self.m_prompt.inc(request.prompt_tokens)
            self.running.append(request)
        per_request = min(self.tokens_per_s / max(1, len(self.running)),
                          self.request_tokens_per_s) * seconds
        for request in list(self.running):
            step = max(1, int(per_request))
            if request.first_token_at is None:
                request.first_token_at = now
                self.m_ttft.observe(now - request.arrived_at + 0.02)
            request.generated += step
            self.m_generation.inc(step)
            if request.generated >= request.target_tokens:
                request.generated = request.target_tokens
                request.done = True
                self.running.remove(request)
        while self.running and self.kv_used() > self.kv_tokens:  # out of KV cache: preempt
            victim = self.running.pop()
            victim.generated, victim.first_token_at = 0, None
            self.waiting.insert(0, victim)
            self.m_preemptions.inc()
        self.m_running.set(len(self.running))
        self.m_waiting.set(len(self.waiting))
        self.m_kv.set(round(self.kv_used() / self.kv_tokens, 4))

    def _poisson(self, mean: float) -> int:
        count, threshold, product = 0, math.exp(-mean), self.random.random()
        while product > threshold:
            count += 1
            product *= self.random.random()
        return count
