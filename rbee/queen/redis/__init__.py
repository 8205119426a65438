"""Several queens, one fleet: the registry and the stream in Redis (or Valkey, which speaks its
protocol), shared by every queen that names the same ``registry.store.url`` and ``key_prefix``.

Writes: the heartbeats a queen takes go to Redis in batches, one Lua script call each
(``writes``, ``lua.HEARTBEATS``): per heartbeat its time of receipt on Redis's clock and a Redis
Stream entry, together; a whole heartbeat (a POST, a channel's snapshot) also replaces the hive's
record, while a channel's delta goes on the stream as the delta, naming the entry it follows, and
every queen's mirror applies it to its own copy of the hive.
Reads: each queen keeps a mirror of the fleet (its ``HiveRegistry``), loaded from Redis at start
and then following the stream, so scheduling queries, ``/metrics``, ``/v1/history`` and the
dashboard cover the whole fleet from any queen and cost Redis nothing. A queen applies its own
writes to its mirror at once too (so it reads what it wrote), and every entry only once, in id
order per hive. The SSE stream of every queen is the Redis Stream, in its order, each event with
its entry id as ``id:``; a client may resume on any queen with ``Last-Event-ID`` (``XRANGE``).

Silence is judged on one clock, Redis's (``TIME``, and entry ids). The sweeps run on one queen at a
time, the holder of a lease (``SET NX PX``, renewed every third of ``lease_s``); when it dies
another queen takes it within ``lease_s`` and a third. A new sweeper counts every hive's silence
from the moment it took over (as Nomad gives every node a fresh TTL after a leader failover), so
the fleet is not marked stale because the sweeper moved. The holder also sends the fleet summary.

When Redis is lost the queens keep serving what their mirrors hold, answer heartbeats with 503
(the hives retry), report ``degraded`` on ``/health``, and reconnect on their own; if Redis came
back empty (restarted without persistence) the mirror reloads and every stream client gets a
fresh snapshot; the hives fill Redis again within one heartbeat interval.

The client is valkey-glide (its async client runs on trio through anyio; a Rust core does the
I/O). Two connections per queen: one for blocking ``XREAD``, one for everything else.

By job: ``keys`` (the keys by name, entry ids), ``lua`` (the scripts), ``connection`` (clients,
calls, the store's problems, Redis's clock), ``writes`` (batched heartbeat writes), ``mirror``
(load and follow the stream, apply deltas), ``sweeper`` (lease, sweeps, summary), ``store`` (the
``FleetStore`` they make together).
"""
