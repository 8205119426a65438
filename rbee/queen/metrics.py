"""The queen's ``/metrics``: the queen itself, beside the whole fleet (``rbee.exposition``).

The queen's own figures: heartbeats received and refused (by reason), the time to ingest one
(read, decode, store, publish), stream clients and lagged clients, the registry's size, and the
HTTP connections (open, the limit, shed at the limit, timed out by ``rbee/http/transport.py``). They
live in a ``CollectorRegistry`` of this queen's own (not prometheus-client's global one), so two
queens in one process, as in the tests, keep their counts apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..contract import HiveRecord
from ..http.transport import ConnectionTable

REFUSAL_REASONS = {400: "invalid", 401: "unauthorized", 409: "out_of_sequence", 413: "too_large",
                   415: "unsupported_encoding"}
"""The reason label of a refused heartbeat, by HTTP status (anything else: ``other``); 409: a
channel's delta that did not follow the last frame taken (the hive resends a snapshot)."""


class QueenMetrics:
    def __init__(self, records: Callable[[], list[HiveRecord]],
                 stream_clients: Callable[[], int], lagged_total: Callable[[], int],
                 connections: ConnectionTable) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
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
        self.registry.register(_QueenState(records, stream_clients, lagged_total, connections))
        self.records = records
        """The fleet, written beside the registry by ``rbee.exposition.render``."""

    def refusal(self, status_code: int) -> None:
        self.refused.labels(REFUSAL_REASONS.get(status_code, "other")).inc()


class _QueenState(Collector):
    def __init__(self, records, stream_clients, lagged_total, connections) -> None:
        self.records, self.stream_clients, self.lagged_total = records, stream_clients, lagged_total
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        hives = self.records()
        yield GaugeMetricFamily("rbee_queen_hives", "Hives in the registry", value=len(hives))
        yield GaugeMetricFamily("rbee_queen_workers", "Workers in the registry",
                                value=sum(len(h.workers) for h in hives))
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
