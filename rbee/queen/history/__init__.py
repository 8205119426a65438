"""Built-in history: per worker and per GPU, a bounded series of each figure, no extra service.

Two tiers per series: ``fine`` (every 5 s for 5 minutes by default) and ``coarse`` (5-minute
means of the fine points, for 6 hours). Values are 16-bit floats (three significant digits, what
a chart needs), plugin figures 32-bit: a built-in series costs 267 bytes at the defaults, which
keep the six worker figures the dashboard, rbee top and rbee workers read
(``history.worker_metrics``, ``history.gpu_metrics``), so 10,000 eight-GPU hives fit in the
default 128 MiB. Series are kept column by column in numpy arrays (``columns``), so a step is
one column write per store. The registry notes each heartbeat's hive to the history (one dict
write); a step gathers only the hives noted since the last one, in batches (``figures``,
``fleet``). A hive that is stale leaves a gap. History is in memory only: it starts empty after
a restart.

Memory is bounded in bytes (``history.max_bytes``): past it, the series of new workers and GPUs
are not recorded (counted in ``FleetHistory.refused``) until old ones are forgotten, which
happens to series not reported for the coarse retention. ``docs/history.md`` is the reference.
"""

from .figures import METRICS
from .fleet import FleetHistory
from .reading import QueryError, Selector

__all__ = ["METRICS", "FleetHistory", "QueryError", "Selector"]
