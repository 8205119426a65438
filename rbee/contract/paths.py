"""The HTTP paths of the contract, named once: the servers' routes, the hive's heartbeat sender,
the stream client and the CLI all use these names."""

from __future__ import annotations

HEALTH = "/health"
METRICS = "/metrics"

# the queen
HEARTBEAT = "/v1/hive-heartbeat"
CHANNEL = "/v1/hive-channel"
"""A hive's channel: a WebSocket of msgpack frames (``rbee/contract/channel.py``)."""
STREAM = "/v1/heartbeats/stream"
HIVES = "/v1/hives"
HIVE = "/v1/hives/{hive_id}"
WORKERS = "/v1/workers"
"""The queen's fleet listing, and the hive's own workers (``POST`` spawns one there)."""
HISTORY = "/v1/history"

# the hive
CAPABILITIES = "/capabilities"
HIVE_WORKER = "/v1/workers/{group}/{instance}"
