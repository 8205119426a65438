"""YAML configuration of the hive and the queen, validated into typed structs (read by
``rbee/configfile.py``; docs/configuration.md is generated from these docstrings).

Every interval, timeout, threshold and limit lives here with a sane default, so an empty file is a
working configuration. Unknown keys are errors (a typo must not silently fall back to a default),
and every error names the file, the key and the problem.
"""

from __future__ import annotations

import re
import socket
from typing import Annotated, Any, Literal

import msgspec

from ._errors import LimitError
from .addresses import check_bind, parse_redis_url
from .configfile import load_config, parse_config  # noqa: F401 (their home for callers)
from .contract import MAX_WORKERS, EndpointUrl, Identifier
from .limits import parse_limits
from .settings import EngineSettings, GcSettings, HistorySettings, PickSettings, Settings

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class HttpSettings(Settings):
    """The HTTP server of the queen and of the hive."""

    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 2**10
    """Largest request body accepted (the queen's default is 4 MiB; a 100-worker heartbeat is
    about 30 KiB)."""
    keep_alive_timeout_s: Seconds = 30.0
    """An idle keep-alive connection (no request in flight) is closed after this long."""
    backlog: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """Connections the kernel queues for accept (listen(2)'s backlog)."""
    shutdown_grace_s: Seconds = 2.0
    """On SIGINT/SIGTERM, how long requests in flight may take to finish."""
    stall_timeout_s: Seconds = 10.0
    """A connection whose peer takes no data for this long is dropped by the kernel
    (TCP_USER_TIMEOUT): a stream client that stopped reading. It also bounds how long such a
    client can delay shutdown."""
    header_timeout_s: Seconds = 10.0
    """A request's headers must be in within this long of its first byte (and a TLS handshake
    within this long of the connection); a slower client is disconnected."""
    body_timeout_s: Seconds = 30.0
    """A request's body must be in whole within this long of its headers (a slow-body client is
    disconnected; under HTTP/2 the request gets 408)."""
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Connections open at once. Past it a new one closes the longest-idle connection, or gets
    503 when all are busy. The descriptor limit is raised to fit it at start (up to the hard
    limit; below that, fewer connections are allowed and a warning says so)."""
    max_body_bytes_in_flight: Annotated[int, msgspec.Meta(ge=1024)] | None = None
    """Bytes of request bodies being read at once, all connections together (at least
    max_body_bytes); unset: 16 times max_body_bytes. A request that would pass it is refused at
    once with 503, so unfinished uploads cannot take the server's memory."""
    tls_cert_file: str | None = None
    """Serve HTTPS with this certificate chain (PEM); needs tls_key_file. HTTP/2 is offered only
    over TLS (ALPN); a plain-TCP server speaks HTTP/1.1 only."""
    tls_key_file: str | None = None
    """The private key (PEM) of tls_cert_file; needs it."""

    def __post_init__(self) -> None:
        if (self.max_body_bytes_in_flight is not None
                and self.max_body_bytes_in_flight < self.max_body_bytes):
            raise ValueError(f"max_body_bytes_in_flight ({self.max_body_bytes_in_flight}) must be "
                             f"at least max_body_bytes ({self.max_body_bytes})")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")

    @property
    def body_budget(self) -> int:
        """``max_body_bytes_in_flight``, or its default."""
        return self.max_body_bytes_in_flight or 16 * self.max_body_bytes


class CgroupSettings(Settings):
    """Where and how the hive puts its workers in cgroups (``rbee/hive/cgroups/``)."""

    backend: Literal["auto", "v2", "v1", "none"] = "auto"
    """Where workers run: "auto" picks v2, else v1, else "none" (plain processes, limits not
    enforced, as an unprivileged hive without a delegated subtree must)."""
    root: str = "auto"
    """Path of the workers' parent cgroup inside the hierarchy; "auto" means the delegated
    subtree under systemd (v2) and ``rbee.slice/<id>`` otherwise. One live hive per root: a hive
    refuses to start on a root another hive holds."""
    io_counters: Literal["auto", "cgroup", "proc"] = "auto"
    """Where I/O bytes are counted: "auto" is io.stat on v2 and the main process's /proc/<pid>/io
    on v1, whose blkio counters stay at 0 on many current kernels; "cgroup" forces blkio."""


class CollectorSettings(Settings):
    """How the hive measures its workers: the collection tick, the GPU source, the plugins."""

    interval_s: Seconds = 1.0
    """How often every worker is measured; the heartbeat carries the latest measurement."""
    gpu: Literal["auto", "nvml", "nvidia-smi", "none"] = "auto"
    """Where GPU figures come from: "auto" tries NVML, then nvidia-smi, then none; "none" on
    a machine without NVIDIA GPUs."""
    nvidia_smi_path: str = "nvidia-smi"
    """The nvidia-smi binary, when NVML cannot be loaded."""
    nvidia_smi_timeout_s: Seconds = 2.0
    """Deadline of one nvidia-smi query; it is killed past it."""
    refresh_timeout_s: Seconds = 3.0
    """Deadline of one GPU refresh (NVML or nvidia-smi), and of one per-process utilisation
    sample, before the tick goes on without it; and of one plugin's async worker refresh
    (``rbee_refresh_workers``) before it is cancelled."""
    gpu_event_wait_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.01
    """How long each sample waits for NVML's Xid events (on the sampling thread, off the tick)."""
    gpu_xid_window_s: Seconds = 300.0
    """How long an Xid that needs no reset keeps its GPU degraded; one that needs a reset keeps
    it unhealthy until the hive restarts."""
    disabled_plugins: list[str] = []
    """Collector plugins left out, by entry-point name (as ``RBEE_DISABLE_PLUGINS``)."""
    plugin_budget_ms: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    """Time one plugin may spend in the per-worker hook over one whole tick; past it, the plugin
    is skipped for the rest of that tick and reported."""
    rate_window_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """The shortest window a worker's rates (CPU %, I/O) are measured over, however often the hive
    collects: CFS enforces CPU quotas per 100 ms period, so shorter windows read far above a
    worker's limit (``rbee.hive.rates``). 0 measures between consecutive collections."""
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)


class WorkerSpec(Settings):
    """A worker the hive keeps running."""

    group: Identifier
    """The worker's group (a model pool, say); ``group/instance`` names it in the fleet."""
    instance: Identifier
    """The worker's name within its group."""
    argv: Annotated[list[str], msgspec.Meta(min_length=1)]
    """The command line, run without a shell; ``{python}`` is this Python, ``{port}`` a free
    port picked at spawn."""
    cpu_limit: str | None = None
    """CPU as a percentage of one core, a string: "200%" is two cores. Unset: no limit."""
    memory_limit: str | int | None = None
    """Memory as bytes or a size string with a binary suffix ("512M", "4G"). Unset: no
    limit."""
    env: dict[str, str] = {}
    """Variables added to the hive's environment for this worker (``CUDA_VISIBLE_DEVICES``)."""
    metrics_url: str | None = None
    """The engine's Prometheus endpoint (``http://127.0.0.1:8000/metrics``). Without it, the port
    is read from argv for known launchers (vllm, sglang, text-generation-launcher, llama-server).
    ``{port}`` here and in argv is replaced by one free port picked at spawn."""
    endpoint: EndpointUrl | None = None
    """Where its inference requests go (``http://10.0.0.7:{port}``; ``/v1/pick`` hands it out)."""
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    """When the hive starts it again: "on-failure" (a non-zero exit or a signal), "always",
    or "never"."""
    restart_backoff_s: Seconds = 1.0
    """The wait before the first restart; it doubles with each failure in a row."""
    restart_backoff_max_s: Seconds = 30.0
    """The longest wait between restarts (and the crashloop's wait)."""
    crashloop_after: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Quick failures in a row (each within ``restart_backoff_max_s`` of its start) after which
    the worker is in ``crashloop``: it waits ``restart_backoff_max_s`` between attempts."""

    def __post_init__(self) -> None:
        # The limits are understood here, so that --check-config and the spawn API refuse
        # "12Q" as the spawn itself would.
        try:
            parse_limits(self.cpu_limit, self.memory_limit)
        except LimitError as exc:
            raise ValueError(str(exc)) from None


class HeartbeatSettings(Settings):
    """How the hive sends its snapshot to the queen, and how it waits when none answers."""

    interval_s: Seconds = 1.0
    """How often the whole snapshot is sent; a spawn or an exit sends one at once too."""
    connect_timeout_s: Seconds = 2.0
    """Deadline of connecting to a queen; past it the next queen is tried."""
    read_timeout_s: Seconds = 5.0
    """Deadline of the queen's answer to one heartbeat."""
    write_timeout_s: Seconds = 5.0
    """Deadline of sending one heartbeat's body."""
    pool_timeout_s: Seconds = 2.0
    """Deadline of waiting for a free connection of the client's pool."""
    backoff_initial_s: Seconds = 0.25
    """The first wait after every queen failed; it doubles (with jitter) up to backoff_max_s."""
    backoff_max_s: Seconds = 1.0
    """The longest wait between failed attempts. At most the interval, so a hive reaches a queen
    that comes back within one interval; raise it for very large fleets."""
    reminder_interval_s: Seconds = 60.0
    """While the queen is unreachable, how often the hive logs that it still is."""
    compress: bool = True
    """Send heartbeats gzip-compressed (Content-Encoding: gzip): 100 workers take about 28 KB
    as JSON and a tenth of that compressed. Turn off for a queen that cannot take it."""
    transport: Literal["auto", "channel", "post"] = "auto"
    """``channel``: one WebSocket, a snapshot then deltas (``docs/channel.md``); ``post``: a whole
    heartbeat per POST; ``auto``: the channel, POST for ``channel_retry_s`` after a refused upgrade."""
    snapshot_every_s: Seconds = 5.0
    """On the channel, a whole snapshot this often; deltas between."""
    max_unacked: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """Channel frames unanswered at most; a hive that is behind sends its newest state, no queue."""
    channel_retry_s: Seconds = 300.0
    """After a refused upgrade (``auto``), how long to POST before trying the channel again."""
    reconnect_initial_s: Seconds = 0.5
    """The first full-jitter reconnect window of a lost channel (after any Retry-After)."""
    reconnect_max_s: Seconds = 15.0
    """The window doubles per failed round up to this: a fleet comes back spread, not at once."""


def _hostname() -> str:
    """This machine's name as a hive id (the contract's charset)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip("_.-")[:128] or "hive"


class HiveConfig(Settings):
    """hive.yaml: one per GPU machine (``rbee-hive --config hive.yaml``)."""

    id: Identifier = msgspec.field(default_factory=_hostname)
    """This hive's name in the fleet (one URL path segment): by default the host name."""
    bind: str = "127.0.0.1"
    """Listen address of the hive's API; 127.0.0.1 keeps spawning local."""
    port: Port = 7835
    """Port of the hive's API (0: a free one, printed at start)."""
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    queen_url: str | list[str] = "http://127.0.0.1:7833"
    """The queen, or several queens sharing one store: heartbeats go to the first that answers,
    and move to the next within one interval when it stops answering."""
    queen_ca_file: str | None = None
    """CA bundle (PEM) the queen's certificate is verified against, for an ``https://``
    queen_url; unset: the system's trusted CAs."""
    stop_grace_s: Seconds = 5.0
    """How long a stopped worker has between SIGTERM and SIGKILL."""
    stop_workers_on_exit: bool = False
    """False keeps workers running over a hive restart (they are re-adopted); ``rbee up`` sets it."""
    heartbeat: HeartbeatSettings = msgspec.field(default_factory=HeartbeatSettings)
    cgroup: CgroupSettings = msgspec.field(default_factory=CgroupSettings)
    collect: CollectorSettings = msgspec.field(default_factory=CollectorSettings)
    workers: list[WorkerSpec] = []
    """Workers the hive starts and keeps running (more can be spawned through its API)."""
    log_dir: str | None = None
    """A directory for each worker's stderr (``<group>-<instance>.log``); unset, the hive
    keeps only the last lines of a worker that ended. Checked at start: exists, writable."""
    auth_token_file: str | None = None
    """A file holding the token shared with the queen (``rbee/http/auth.py``): sent with every
    heartbeat, and asked of whoever spawns or stops workers through the API. Unset: none."""
    credential_file: str | None = None
    """A file holding this hive's own secret (``rbee credential new ID``), sent with every
    heartbeat instead of the shared token: the queen then lets this hive post, say goodbye and
    be removed only as ``id`` (``rbee/credentials.py``). Unset: the token, if any, is sent."""
    plugins: dict[str, dict[str, Any] | None] = {}
    """One section per collector plugin, by its entry-point name, validated by the struct the
    plugin provides (``rbee.plugin.PluginSettings``) when the plugins are loaded: at start-up and
    by ``--check-config`` (docs/plugins.md)."""

    @property
    def queen_urls(self) -> list[str]:
        return [self.queen_url] if isinstance(self.queen_url, str) else list(self.queen_url)

    def __post_init__(self) -> None:
        check_bind(self.bind)
        urls = self.queen_urls
        if not urls:
            raise ValueError("queen_url: the list names no queen")
        if len(set(urls)) != len(urls):
            raise ValueError("queen_url: a queen is listed twice")
        seen = set()
        for spec in self.workers:
            if (spec.group, spec.instance) in seen:
                raise ValueError(f"worker {spec.group}/{spec.instance} is listed twice")
            seen.add((spec.group, spec.instance))


_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class StoreSettings(Settings):
    """Where the fleet registry and the stream live (``rbee/queen/store.py``). ``memory`` keeps
    them in this queen (one queen; the default, nothing else to run); ``redis`` keeps them in a
    Redis or Valkey server that several queens share (``rbee/queen/redis/``)."""

    kind: Literal["memory", "redis"] = "memory"
    """Where the registry lives: "memory" (this queen) or "redis" (shared by several queens)."""
    url: str | None = None
    """``redis://host:6379/0`` (``rediss://`` for TLS); required with ``kind: redis``."""
    key_prefix: str = "rbee"
    """Every key the queens use starts with ``<key_prefix>:``, so fleets can share one server."""
    connect_timeout_s: Seconds = 2.0
    """Deadline of connecting to Redis, at start and on every reconnection."""
    request_timeout_s: Seconds = 2.0
    """Deadline of one Redis command."""
    lease_s: Annotated[float, msgspec.Meta(ge=0.3, le=60)] = 1.5
    """How long the sweeper's lease lives unless renewed (every third of it): when the sweeping
    queen dies, another takes over within this long plus a third."""

    def __post_init__(self) -> None:
        if not _KEY_PREFIX.match(self.key_prefix):
            raise ValueError(f"key_prefix {self.key_prefix!r} must be 1-64 of A-Z a-z 0-9 _ . : -")
        if self.kind == "memory":
            if self.url is not None:
                raise ValueError("url is for kind: redis; the memory store takes none")
            return
        if self.url is None:
            raise ValueError("kind: redis needs url (redis://host:6379/0)")
        parse_redis_url(self.url)


class RegistrySettings(Settings):
    """How the queen judges hives by the silence since their last heartbeat (one clock: the
    queen's own, or Redis's with the redis store)."""

    stale_after_s: Seconds = 5.0
    """Silent this long: shown as stale, no longer offered by scheduling queries."""
    remove_after_s: Seconds = 60.0
    """Silent this long: removed with its workers, and the removal announced on the stream."""
    cleanup_interval_s: Seconds = 1.0
    """How often the queen sweeps for stale and silent hives."""
    idle_gpu_util_pct: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """A worker at or under this GPU utilisation counts as idle (an unknown figure never does)."""
    skip_unhealthy_gpus: bool = True
    """Scheduling queries leave out workers on a GPU whose health is unhealthy (ECC errors, a
    reset pending, a fatal Xid)."""
    mass_silence_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    """If more than this share of the hives falls silent at once, the queen suspects its own side
    (network, a stall) and removes none of them; they stay stale until they return."""
    mass_silence_min_hives: Annotated[int, msgspec.Meta(ge=1)] = 3
    """The guard applies only to fleets of at least this many established hives."""
    established_after_s: Seconds = 30.0
    """A hive that has been reporting for this long is *established*: only established hives
    count towards the mass-silence guard and only they are held by it. Hives that appeared and
    never came back (a burst of fake ids) are removed at ``remove_after_s`` like any other."""
    max_hives: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """The most hives the queen keeps; a heartbeat from one more new hive is refused (503)
    naming this cap. Hives already known are never refused."""
    new_hives_per_s: Annotated[float, msgspec.Meta(gt=0)] = 500.0
    """Rate at which hives the queen does not know yet are admitted (a token bucket); one over it
    is refused with 429 and Retry-After. Hives already known are never refused. With the burst,
    a restarted queen takes back ``max_hives`` (10,000) within 16 s."""
    new_hives_burst: Annotated[int, msgspec.Meta(ge=1)] = 2000
    """How many new hives may be admitted at once before ``new_hives_per_s`` applies: the
    first part of a whole fleet coming back to a restarted queen."""
    workers_limit: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """``GET /v1/workers`` answers at most this many workers unless ``limit`` asks otherwise;
    the rest come page by page (``X-Next-After``)."""
    workers_max_limit: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """The largest ``limit`` a ``GET /v1/workers`` may ask for."""
    hives_limit: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """``GET /v1/hives`` answers at most this many hives unless ``limit`` asks otherwise (up to
    ``max_hives``); the rest come page by page (``X-Next-After``)."""
    max_workers_per_hive: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] = 1024
    """A heartbeat with more workers is refused (400), so one hive cannot make the queen hold
    more than this many worker records."""
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)

    def __post_init__(self) -> None:
        if self.workers_limit > self.workers_max_limit:
            raise ValueError(
                f"workers_limit ({self.workers_limit}) must not exceed "
                f"workers_max_limit ({self.workers_max_limit})")
        if self.remove_after_s <= self.stale_after_s:
            raise ValueError(
                f"remove_after_s ({self.remove_after_s:g}) must be greater than "
                f"stale_after_s ({self.stale_after_s:g})")


class StreamSettings(Settings):
    """The live SSE stream, ``GET /v1/heartbeats/stream``."""

    queen_interval_s: Seconds = 2.5
    """How often the fleet summary (event type ``queen``) is sent."""
    keepalive_s: Seconds = 15.0
    """Idle connections get a comment line this often, so proxies keep them open."""
    client_buffer: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Events queued per client; a client further behind is told it lagged and resynced."""
    client_buffer_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 * 2**20
    """Bytes queued per client (frames are shared between clients, so this bounds what one
    slow client can pin); a client further behind is told it lagged and resynced."""
    write_chunk_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 2**10
    """Queued frames are written to a client in pieces of at most this many bytes (a single
    larger frame goes alone), so catching up never copies a whole backlog at once."""
    max_clients: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Stream clients at once; one more gets 503 naming this key."""
    replay_events: Annotated[int, msgspec.Meta(ge=1)] = 1000
    """Events kept for clients that reconnect with ``Last-Event-ID`` (with redis, the stream's
    ``MAXLEN ~``): one that missed more gets a snapshot instead."""
    replay_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * 2**20
    """With the memory store, the JSON bytes those kept events may add up to: one hive's
    1,000 heartbeats of ``max_body_bytes`` each would otherwise pin gigabytes."""


class MetricsSettings(Settings):
    """The queen's ``GET /metrics`` (docs/operations.md: Prometheus)."""

    max_workers: Annotated[int, msgspec.Meta(ge=0)] = 20_000
    """Each worker and GPU is listed while the fleet holds at most this many workers. Past it
    only the hives' and the queen's own series are, ``rbee_queen_metrics_workers_omitted`` says
    how many workers were left out, and each hive's own ``/metrics`` serves its workers and
    GPUs: 80,000 workers are some 2 million samples, seconds of the queen's core per scrape."""


class QueenConfig(Settings):
    """queen.yaml: the fleet's queen (``rbee-queen --config queen.yaml``)."""

    bind: str = "127.0.0.1"
    """Listen address; a fleet's queen needs its network address (or 0.0.0.0) here."""
    port: Port = 7833
    """Listen port (0: a free one, printed at start)."""
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(
        max_body_bytes=4 * 2**20, max_connections=4000))
    registry: RegistrySettings = msgspec.field(default_factory=RegistrySettings)
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    history: HistorySettings = msgspec.field(default_factory=HistorySettings)
    pick: PickSettings = msgspec.field(default_factory=PickSettings)
    gc: GcSettings = msgspec.field(default_factory=GcSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    channel_enabled: bool = True
    """False: every upgrade to a hive channel is refused (403), and hives POST."""
    auth_token_file: str | None = None
    """A file holding the token shared with the hives (``rbee/http/auth.py``): asked of every
    heartbeat and of a hive's removal. Unset: none is asked for. With per-hive credentials it is
    the admin's power: it may act for any hive."""
    hive_credentials_file: str | None = None
    """A file of ``hive_id:sha256$salt$hash`` lines (``rbee/credentials.py``): a hive that sends
    its secret may post, say goodbye and be removed only as itself. Re-read when it changes."""
    read_token_file: str | None = None
    """A file holding a token asked of reads: the stream, ``/v1/hives``, ``/v1/workers``,
    ``/v1/history`` and ``/metrics`` (the shared token is accepted too). Unset: reads are open."""

    def __post_init__(self) -> None:
        check_bind(self.bind)
