"""The queen's ``/metrics``: the queen itself, beside the whole fleet (``rbee.exposition``).

The queen's own figures: heartbeats received and refused (by reason), the time to ingest one
(read, decode, store, publish), stream clients and lagged clients, the registry's size, and the
HTTP connections (open, the limit, shed at the limit, timed out by ``rbee/http/transport.py``),
and the workers a scrape left out past ``metrics.max_workers`` (``QueenMetrics.detail``). They
live in a ``CollectorRegistry`` of this queen's own (not prometheus-client's global one), so two
queens in one process, as in the tests, keep their counts apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..contract import HiveRecord
from ..http.transport import ConnectionTable

log = logging.getLogger("rbee.queen")

REFUSAL_REASONS = {400: "invalid", 401: "unauthorized", 409: "out_of_sequence", 413: "too_large",
                   415: "unsupported_encoding"}
"""The reason label of a refused heartbeat, by HTTP status (anything else: ``other``); 409: a
channel's delta that did not follow the last frame taken (the hive resends a snapshot)."""


class ScrapedFleet(Protocol):
    """What the queen's ``/metrics`` reads of its registry (``HiveRegistry``)."""

    def records(self) -> list[HiveRecord]:
        """Every hive, for the fleet's samples."""
        ...

    def counts(self) -> tuple[int, int]:
        """Hives and workers, for the queen's own: without a record per hive, so a scrape of
        the queen's counters alone (``name[]``) costs nothing per hive."""
        ...


class QueenMetrics:
    def __init__(self, fleet: ScrapedFleet,
                 stream_clients: Callable[[], int], lagged_total: Callable[[], int],
                 connections: ConnectionTable, max_workers: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.max_workers = max_workers
        """``metrics.max_workers`` (None: no limit)."""
        self.workers_omitted = Gauge(
            "rbee_queen_metrics_workers_omitted", "Workers the last scrape left out (their and "
            "their GPUs' series), past metrics.max_workers: each hive's /metrics has them",
            registry=self.registry)
        self._omitted = 0
        self.received = Counter("rbee_queen_heartbeats_received", "Heartbeats accepted",
                                registry=self.registry)
        self.refused = Counter("rbee_queen_heartbeats_refused", "Heartbeats refused, by reason",
                               ["reason"], registry=self.registry)
        for reason in (*REFUSAL_REASONS.values(), "other"):
            self.refused.labels(reason)  # every reason present from the start, at 0
        self.ingest = Histogram(
            "rbee_queen_heartbeat_ingest_seconds", "Time to read, decode, store and publish one",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry)
        self.channels = Gauge("rbee_queen_channels", "Hive channels open (WebSockets)",
                              registry=self.registry)
        self.registry.register(_QueenState(fleet.counts, stream_clients, lagged_total,
                                           connections))
        self.records = fleet.records
        """The fleet, written beside the registry by ``rbee.scrape.exposition``."""

    def refusal(self, status_code: int) -> None:
        self.refused.labels(REFUSAL_REASONS.get(status_code, "other")).inc()

    def detail(self, hives: list[HiveRecord]) -> bool:
        """Whether a scrape lists each worker and GPU of ``hives``: not past ``max_workers``
        (a fleet's every worker is ~20 samples, and a scrape holds the queen's core while it
        writes them). Said in the log when it turns, and by ``workers_omitted`` each scrape."""
        workers = sum(len(hive.workers) for hive in hives)
        listed = self.max_workers is None or workers <= self.max_workers
        if listed != (self._omitted == 0):
            if listed:
                log.warning("/metrics lists every worker and GPU again: %d workers, "
                            "metrics.max_workers %d", workers, self.max_workers)
            else:
                log.warning("/metrics leaves out the workers' and GPUs' series: %d workers, "
                            "more than metrics.max_workers (%d); each hive's /metrics has its "
                            "own", workers, self.max_workers)
        self._omitted = 0 if listed else workers
        self.workers_omitted.set(self._omitted)
        return listed


class _QueenState(Collector):
    def __init__(self, counts, stream_clients, lagged_total, connections) -> None:
        self.counts, self.stream_clients, self.lagged_total = counts, stream_clients, lagged_total
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        hives, workers = self.counts()
        yield GaugeMetricFamily("rbee_queen_hives", "Hives in the registry", value=hives)
        yield GaugeMetricFamily("rbee_queen_workers", "Workers in the registry", value=workers)
        yield GaugeMetricFamily("rbee_queen_stream_clients", "Clients of the live stream",
                                value=self.stream_clients())
        yield CounterMetricFamily("rbee_queen_stream_lagged", "Times a stream client lagged "
                                  "and was resynced with a snapshot", value=self.lagged_total())
        table = self.connections
        yield GaugeMetricFamily("rbee_queen_connections", "Open HTTP connections",
                                value=table.open)
        yield GaugeMetricFamily("rbee_queen_connections_limit", "http.max_connections, as the "
                                "descriptor limit allows it", value=table.limit)
        yield CounterMetricFamily("rbee_queen_connections_shed", "Connections closed or refused "
                                  "because the limit was reached", value=table.shed_total)
        yield CounterMetricFamily("rbee_queen_connections_timed_out", "Connections closed "
                                  "because a request's headers or body came too slowly",
                                  value=table.timed_out_total)
