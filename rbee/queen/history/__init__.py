"""Built-in history: per worker and per GPU, a bounded series of each figure, no extra service.

Two tiers per series: ``fine`` (1 s for 15 minutes by default) and ``coarse`` (10 s means of the
fine points, for 6 hours). Values are 16-bit floats (three significant digits, what a chart
needs), plugin figures 32-bit: a built-in series costs 6,123 bytes at the defaults. They are
kept column by column in numpy arrays (``columns``), so the queen records the whole fleet once per
fine step with one column write per store, and gathers the figures only of the hives that sent a
heartbeat since the last step, in batches (``figures``, ``fleet``). A hive that is stale leaves a
gap. History is in memory only: it starts empty after a restart.

Memory is bounded in bytes (``history.max_bytes``): past it, the series of new workers and GPUs
are not recorded (counted in ``FleetHistory.refused``) until old ones are forgotten, which
happens to series not reported for the coarse retention. ``docs/history.md`` is the reference.
"""

from .figures import METRICS
from .fleet import FleetHistory
from .reading import QueryError, Selector

__all__ = ["METRICS", "FleetHistory", "QueryError", "Selector"]
