"""The contract's bounds: what any message may hold, so what the queen keeps is bounded.

Whatever a client sends, the decoder refuses (naming the field) rather than stores: ids (hive id,
group, instance) are 1-128 characters of ``[A-Za-z0-9_.-]`` starting with a letter or digit (no
``/``, so ``hive/group/instance`` is unambiguous and a hive id is one URL path segment; no
whitespace or control characters, so an id cannot forge a log line or drive a terminal); free text
is capped (``SHORT_TEXT_CHARS``, ``LONG_TEXT_CHARS``); plugin ``metrics`` are capped in count, key
length and charset; every number is finite and at most ``MAX_FIGURE``, so a sum over the most
workers and GPUs a heartbeat may carry stays finite; lists are capped (``MAX_WORKERS`` and the
queen's own ``registry.max_workers_per_hive``). A hive cuts what it collects to these bounds
(``rbee/hive/fitting.py``) before sending, so its heartbeats always decode.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

MIB = 2**20
MAX_FIGURE = 2**40
"""The largest value of any figure (MiB, MiB/s, percent, seconds): a mebibyte figure of 2**40 is
an exbibyte, and 4096 such figures still sum to an exact, finite float."""
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ID_MAX_CHARS = 128
SHORT_TEXT_CHARS = 256
"""Model, hostname, version, GPU name and UUID, collector name."""
LONG_TEXT_CHARS = 2048
"""An error message or a health reason."""
MAX_WORKERS = 4096
"""Workers in one heartbeat, whatever the queen's config; ``registry.max_workers_per_hive``
(1024 by default) is the cap a queen applies."""
MAX_GPUS = 256
"""GPUs in one heartbeat, and GPU indices of one worker."""
MAX_ERRORS = 32
"""Collector errors of one worker."""
MAX_METRICS = 64
"""Plugin metrics of one worker."""
METRIC_KEY_PATTERN = r"^[A-Za-z0-9_.:-]+$"
METRIC_KEY_CHARS = 64

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_FIGURE)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_FIGURE)]
SignedFloat = Annotated[float, msgspec.Meta(ge=-MAX_FIGURE, le=MAX_FIGURE)]
WholeMib = Annotated[int, msgspec.Meta(ge=0, le=MAX_FIGURE)] | NonNegFloat
"""A MiB figure the original system types as an unsigned integer: sent as an integer, accepted as
a float too (older hives sent ``19.83``) and rounded on decoding."""
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**22)]
"""At most the kernel's largest ``pid_max``."""
GpuIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_GPUS)]
UtcTimestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS,
                                         pattern=ID_PATTERN)]
"""A hive id, a worker's group or instance."""
WorkerName = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS)]
"""A group or instance: an ``Identifier`` whose pattern ``decode_heartbeat`` checks through a
cache of names already seen (a regex per name would double the decoding time of a heartbeat, and
a fleet's names repeat every second)."""
ShortText = Annotated[str, msgspec.Meta(max_length=SHORT_TEXT_CHARS)]
EndpointUrl = Annotated[str, msgspec.Meta(max_length=SHORT_TEXT_CHARS, pattern=r"^https?://[^\s/]+")]
"""Where a worker serves: an http(s) URL with a host (and usually a port), a path allowed."""
LongText = Annotated[str, msgspec.Meta(max_length=LONG_TEXT_CHARS)]
MetricKey = Annotated[str, msgspec.Meta(min_length=1, max_length=METRIC_KEY_CHARS,
                                        pattern=METRIC_KEY_PATTERN)]
Metrics = Annotated[dict[MetricKey, SignedFloat], msgspec.Meta(max_length=MAX_METRICS)]


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"
