"""The history's figures on the queen's ``/metrics``: what it holds, its budget, what it refused.

A queen past ``history.max_bytes`` answers every query as usual, for the series it holds; the
series it could not take are counted here (``rbee_queen_history_refused_series``), so an operator
sees that the budget is too small for the fleet rather than guessing from gaps.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .fleet import FleetHistory


class HistoryGauges(Collector):
    def __init__(self, history: FleetHistory) -> None:
        self.history = history

    def collect(self) -> Iterator[Metric]:
        history = self.history
        yield GaugeMetricFamily("rbee_queen_history_series", "Series the history holds",
                                value=len(history))
        yield GaugeMetricFamily("rbee_queen_history_bytes", "Bytes the history's series take",
                                value=history.budget.used)
        yield GaugeMetricFamily("rbee_queen_history_max_bytes", "history.max_bytes",
                                value=history.budget.max_bytes)
        yield CounterMetricFamily("rbee_queen_history_refused_series", "Series not recorded "
                                  "because history.max_bytes was reached", value=history.refused)
