"""The queen under hostile connections, a few hundred of each kind, while a real hive heartbeats to
it: slow headers, slow bodies, idle sockets beyond the connection cap, unfinished big bodies,
HTTP/2 prior knowledge over plain TCP, stream clients that stop reading. The queen is a real
``rbee-queen`` process (its own event loop, measured from outside), the hostile clients raw sockets
on 127.0.0.1. The thousand-connection versions, with figures, are bench/test_bench_hostile.py."""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import statistics
import subprocess

import httpx
import psutil
import pytest
import trio
import trustme
import yaml

from rbee._errors import ConfigError
from rbee.config import HiveConfig, QueenConfig, parse_config
from rbee.contract import encode

from .builders import fleet_heartbeat
from .daemons import BIN, Daemon
from .hivekit import hive_config, start_hive
from .hostilekit import (
    HTTP2_PREFACE,
    HTTP2_SETTINGS,
    health_latencies,
    open_hostile,
    raise_descriptor_limit,
    slow_body,
    slow_headers,
    watch_deliveries,
)
from .queenkit import start_queen, wait_until

HOSTILE = 150
"""Hostile connections per scenario here (the bench opens 1,000)."""
HEARTBEAT = {"interval_s": 0.2, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
             "connect_timeout_s": 2.0, "read_timeout_s": 2.0, "write_timeout_s": 2.0}
LONGEST_GAP_S = 2.0
"""The longest a real hive may go without delivering (10 intervals; a hive's read timeout is 5 s
by default): generous, for a shared 2-core machine."""


@pytest.fixture(autouse=True)
def descriptors():
    raise_descriptor_limit(4 * HOSTILE + 256)


def queen_daemon(tmp_path, **http: object) -> Daemon:
    config = {"port": 0, "http": {"max_body_bytes": 4 * 2**20, **http},
              "stream": {"queen_interval_s": 3600, "keepalive_s": 3600}}
    return Daemon("rbee-queen", tmp_path / "queen.yaml", yaml.safe_dump(config))


async def queen_metric(url: str, name: str) -> float:
    """One sample of the queen's /metrics (a metric without labels)."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{url}/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith(f"{name} ")))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def real_hive(nursery: trio.Nursery, tag: str, queen_url: str, **sender_options):
    """A real hive (no workers) heartbeating every 0.2 s; returns its sender once it delivered."""
    _, sender = await start_hive(nursery, hive_config(tag, heartbeat=HEARTBEAT), queen_url,
                                 **sender_options)
    await wait_until(lambda: sender.state.delivered >= 2, timeout=10)
    return sender


async def test_slow_headers_are_cut_at_the_header_timeout(tmp_path, nursery):
    """Connections that send a request line, then one header byte every 0.3 s, are closed
    header_timeout_s after their first byte; the hive's heartbeats go on meanwhile."""
    with queen_daemon(tmp_path, header_timeout_s=1.0) as queen:
        sender = await real_hive(nursery, "hard-headers", queen.url)
        async with trio.open_nursery() as attack:
            hostile = await open_hostile(attack, port_of(queen.url), HOSTILE,
                                         first=slow_headers(), trickle=b"a", every_s=0.3)
            delivered = await watch_deliveries(sender, 4.0)
            attack.cancel_scope.cancel()
        timed_out = await queen_metric(queen.url, "rbee_queen_connections_timed_out_total")
    assert hostile.opened == HOSTILE
    assert timed_out >= HOSTILE
    assert len(hostile.closed_after) == HOSTILE, "every slow-headers connection is closed"
    assert max(hostile.closed_after) < 1.0 + 2.5
    assert delivered.longest_gap_s < LONGEST_GAP_S, delivered
    assert delivered.count >= 5, delivered


async def test_slow_bodies_are_cut_at_the_body_timeout(tmp_path, nursery):
    """Connections whose headers are whole and whose body comes one byte every 0.3 s are closed
    body_timeout_s after their headers (without the fix: held forever); heartbeats go on."""
    with queen_daemon(tmp_path, body_timeout_s=1.5) as queen:
        sender = await real_hive(nursery, "hard-bodies", queen.url)
        async with trio.open_nursery() as attack:
            hostile = await open_hostile(attack, port_of(queen.url), HOSTILE,
                                         first=slow_body(60_000), trickle=b" ", every_s=0.3)
            delivered = await watch_deliveries(sender, 4.5)
            attack.cancel_scope.cancel()
    assert len(hostile.closed_after) == HOSTILE, "every slow-body connection is closed"
    assert max(hostile.closed_after) < 1.5 + 2.5
    assert delivered.longest_gap_s < LONGEST_GAP_S, delivered


async def _exchange_in_two_writes(stream: trio.SocketStream, body: bytes, pause_s: float) -> bytes:
    """One request on a kept-alive connection as httpx writes it: headers, then (``pause_s``
    later) the body. Returns the status line, or b"" when the queen closed the connection."""
    head = (b"POST /v1/hive-heartbeat HTTP/1.1\r\nhost: q\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    await stream.send_all(head)
    await trio.sleep(pause_s)
    await stream.send_all(body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        answer += chunk
    headers, _, rest = answer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    return headers.split(b"\r\n")[0]


@pytest.mark.parametrize("timeout_key", ["body_timeout_s", "header_timeout_s"])
async def test_keep_alive_requests_each_get_their_own_deadlines(timeout_key, nursery):
    """A hive's keep-alive connection (httpx writes headers and body separately) lives far longer
    than body_timeout_s: every request's body is timed from its own headers, never from an
    earlier request's. Before the fix, the third request's connection was closed unanswered."""
    queen = await start_queen(nursery, http={timeout_key: 0.5})
    body = encode(fleet_heartbeat("keepalive", 4))
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(queen.urls[0]))
        async with stream:
            started = trio.current_time()
            for n in range(10):  # ~3 s on one connection: six body timeouts
                status = await _exchange_in_two_writes(stream, body, pause_s=0.1)
                assert status == b"HTTP/1.1 200 ", f"request {n + 1} got {status!r}"
                await trio.sleep(0.2)
            assert trio.current_time() - started > 5 * 0.5


async def test_idle_sockets_beyond_the_cap_make_room_for_real_clients(tmp_path, nursery):
    """With max_connections 100, 2 x 100 idle sockets: the longest-idle ones are closed as new
    ones come, so the hive and a /health probe always get in; when every connection is busy
    (slow bodies), a new one is answered 503 naming the key."""
    with queen_daemon(tmp_path, max_connections=100, body_timeout_s=20) as queen:
        sender = await real_hive(nursery, "hard-idle", queen.url)
        async with trio.open_nursery() as attack:
            idle = await open_hostile(attack, port_of(queen.url), 2 * 100)
            delivered = await watch_deliveries(sender, 3.0)
            latencies = await health_latencies(queen.url, 1.0)
            attack.cancel_scope.cancel()
        assert len(idle.closed_after) >= 100, "idle sockets past the cap are closed"
        assert await queen_metric(queen.url, "rbee_queen_connections_shed_total") >= 100
        assert await queen_metric(queen.url, "rbee_queen_connections_limit") == 100
        assert delivered.longest_gap_s < LONGEST_GAP_S, delivered
        assert max(latencies) < 1.0

        async with trio.open_nursery() as attack:
            busy = await open_hostile(attack, port_of(queen.url), 100, first=slow_body(60_000))
            # Time for the queen to read all 100 headers (a connection still in its headers
            # counts as idle and would be shed instead): 2 s, for a loaded 2-core machine.
            await trio.sleep(2.0)
            extra = await open_hostile(attack, port_of(queen.url), 10)
            await wait_until(lambda: len(extra.replies) == 10, timeout=10)
            attack.cancel_scope.cancel()
    assert busy.opened == 100
    refused = [reply for reply in extra.replies if reply.startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 5, extra.replies
    assert b"too many connections (http.max_connections: 100)" in refused[0]


async def test_unfinished_big_bodies_stay_within_the_budget(tmp_path, nursery):
    """100 connections each send 4 MiB - 2 bytes of a 4 MiB - 1 body and wait: with
    max_body_bytes_in_flight 16 MiB only 4 are read, the others get 503 at once, and the queen's
    memory grows by far less than their 400 MB (without the budget: +415 MB, measured)."""
    size = 4 * 2**20 - 1
    with queen_daemon(tmp_path, max_body_bytes_in_flight=16 * 2**20, body_timeout_s=30) as queen:
        process = psutil.Process(queen.process.pid)
        sender = await real_hive(nursery, "hard-big", queen.url)
        before = process.memory_info().rss
        async with trio.open_nursery() as attack:
            hostile = await open_hostile(attack, port_of(queen.url), 100, first=slow_body(size),
                                         payload=size - 2)
            delivered = await watch_deliveries(sender, 3.0)
            grown = process.memory_info().rss - before
            attack.cancel_scope.cancel()
    assert len(hostile.closed_after) >= 90, "refused bodies are closed at once"
    statuses = hostile.status_codes()
    assert statuses.count(503) >= 50, hostile.replies[:5]
    assert any(b"max_body_bytes_in_flight" in reply for reply in hostile.replies)
    assert grown < 120 * 2**20, f"the queen grew by {grown / 2**20:.0f} MiB"
    assert delivered.longest_gap_s < LONGEST_GAP_S, delivered


async def test_http2_is_not_spoken_over_plain_tcp(tmp_path, nursery):
    """A prior-knowledge HTTP/2 preface gets no HTTP/2 (no SETTINGS frame): the connection is
    closed at once; an ``Upgrade: h2c`` request is answered in HTTP/1.1, not 101."""
    with queen_daemon(tmp_path) as queen:
        sender = await real_hive(nursery, "hard-h2c", queen.url)
        async with trio.open_nursery() as attack:
            hostile = await open_hostile(attack, port_of(queen.url), HOSTILE,
                                         first=HTTP2_PREFACE + HTTP2_SETTINGS)
            upgrade = await open_hostile(
                attack, port_of(queen.url), 1,
                first=b"GET /health HTTP/1.1\r\nhost: q\r\nconnection: upgrade, http2-settings\r\n"
                      b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n")
            delivered = await watch_deliveries(sender, 2.0)
            await wait_until(lambda: upgrade.replies, timeout=5)
            attack.cancel_scope.cancel()
    assert len(hostile.closed_after) == HOSTILE
    assert set(hostile.replies[:HOSTILE]) == {b""}, "not one byte of HTTP/2 (or anything) was answered"
    assert max(hostile.closed_after) < 2.0
    assert upgrade.replies and upgrade.replies[0].startswith(b"HTTP/1.1 200"), upgrade.replies
    assert delivered.longest_gap_s < LONGEST_GAP_S, delivered


async def test_stream_clients_that_stop_reading_never_block_the_queen(tmp_path, nursery):
    """20 stream clients that never read while heartbeats of 400 workers (~190 KB frames) come
    5 times a second: /health answers fast all along, and the clients are dropped after
    stall_timeout_s (their backlog is let go at once, not joined)."""
    frame = encode(fleet_heartbeat("big-hive", 400))
    with queen_daemon(tmp_path, stall_timeout_s=1.0) as queen:
        sockets = []
        try:
            for _ in range(20):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port_of(queen.url)))
                sock.sendall(b"GET /v1/heartbeats/stream HTTP/1.1\r\nhost: q\r\n\r\n")
                sockets.append(sock)
            async with httpx.AsyncClient(base_url=queen.url, timeout=10.0) as client:
                with trio.fail_after(5):
                    while (await client.get("/health")).json()["stream_clients"] < 20:
                        await trio.sleep(0.05)

                async def publish() -> None:
                    while True:
                        response = await client.post("/v1/hive-heartbeat", content=frame,
                                                     headers={"content-type": "application/json"})
                        assert response.status_code == 200, response.text
                        await trio.sleep(0.2)

                async with trio.open_nursery() as load:
                    load.start_soon(publish)
                    latencies = await health_latencies(queen.url, 4.0)
                    load.cancel_scope.cancel()
                with trio.fail_after(15):
                    while (await client.get("/health")).json()["stream_clients"]:
                        await trio.sleep(0.2)
        finally:
            for sock in sockets:
                sock.close()
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 1.0, latencies


@pytest.fixture
def tls_files(tmp_path):
    """A CA made for this test, and a certificate for 127.0.0.1 signed by it (trustme)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "queen.pem", "key": tmp_path / "queen.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


async def test_tls_queen_hive_and_cli(tls_files, nursery):
    """A queen serving HTTPS from its certificate files: a hive that trusts the CA delivers
    (``queen_url: https://...``, ``queen_ca_file``), one that does not is refused by its own TLS
    check; HTTP/2 is offered over TLS; ``rbee workers --ca-file`` and ``rbee top`` (with
    ``RBEE_CA_FILE``) read it."""
    queen = await start_queen(nursery, http={"tls_cert_file": tls_files["cert"],
                                             "tls_key_file": tls_files["key"]})
    url = queen.urls[0]
    assert url.startswith("https://127.0.0.1:")
    sender = await real_hive(nursery, "tls-trusting", url, ca_file=tls_files["ca"])
    assert queen.registry.get_hive("hive-test").stale is False

    _, stranger = await start_hive(nursery, hive_config("tls-stranger", heartbeat=HEARTBEAT), url)
    await wait_until(lambda: stranger.state.failed_attempts >= 1, timeout=10)
    assert stranger.state.delivered == 0
    assert "ConnectError" in stranger.state.last_problem

    context = ssl.create_default_context(cafile=tls_files["ca"])
    async with httpx.AsyncClient(http2=True, verify=context, timeout=5.0) as client:
        response = await client.get(f"{url}/health")
    assert response.status_code == 200 and response.http_version == "HTTP/2"

    result = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(BIN / "rbee"), "workers", "--queen", url, "--ca-file", tls_files["ca"], "--json"],
        capture_output=True, text=True, timeout=30))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    top = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(BIN / "rbee"), "top", "--rounds", "1", "--queen", url],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "RBEE_CA_FILE": tls_files["ca"]}))
    assert top.returncode == 0, top.stderr
    assert f"rbee: queen {url}\n1 hive (0 stale), 0 workers" in top.stdout
    untrusted = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(BIN / "rbee"), "workers", "--queen", url], capture_output=True, text=True,
        timeout=30))
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    assert sender.state.failed_attempts == 0


async def test_tls_hive_api(tls_files, nursery):
    """The hive's own API serves HTTPS from its files too."""
    from rbee.hive.service import HiveService

    config = hive_config("tls-api", port=0, queen_url="https://127.0.0.1:9",
                         http={"tls_cert_file": tls_files["cert"],
                               "tls_key_file": tls_files["key"]})
    hive = HiveService(config)
    urls = await nursery.start(hive.run)
    assert urls[0].startswith("https://")
    context = ssl.create_default_context(cafile=tls_files["ca"])
    async with httpx.AsyncClient(verify=context, timeout=5.0) as client:
        assert (await client.get(f"{urls[0]}/health")).status_code == 200
    hive.stop()


def test_descriptor_limit_caps_connections(tmp_path):
    """A hard RLIMIT_NOFILE below max_connections: the queen starts with fewer connections and
    says so, naming the key and the limit to raise."""
    (tmp_path / "queen.yaml").write_text("port: 0\nhttp: {max_connections: 1000}\n")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    process = subprocess.Popen([str(BIN / "rbee-queen"), "--config", str(tmp_path / "queen.yaml")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=low_limit)
    try:
        assert "listening on http://" in process.stdout.readline()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert ("http.max_connections is 1000 but the descriptor limit (RLIMIT_NOFILE) is 200: "
            "capped at 136 connections") in stderr


@pytest.mark.parametrize(("config_type", "data", "message"), [
    (QueenConfig, {"http": {"tls_cert_file": "/c.pem"}},
     "tls_cert_file and tls_key_file go together"),
    (QueenConfig, {"http": {"max_body_bytes": 2**20, "max_body_bytes_in_flight": 2**19}},
     "max_body_bytes_in_flight (524288) must be at least max_body_bytes (1048576)"),
    (QueenConfig, {"http": {"header_timeout_s": 0}}, "http.header_timeout_s"),
    (HiveConfig, {"http": {"max_connections": 0}}, "http.max_connections"),
    (QueenConfig, {"stream": {"client_buffer_bytes": 10}}, "stream.client_buffer_bytes"),
])
def test_hardening_keys_are_validated(config_type, data, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(data, config_type, "<test>")
    assert message in str(caught.value)


def test_unreadable_tls_files_fail_the_config_check(tmp_path, tls_files):
    """``--check-config`` (and so start-up) refuses a CA bundle or a certificate it cannot load,
    naming the key."""
    hive_yaml = tmp_path / "hive.yaml"
    hive_yaml.write_text(yaml.safe_dump({"queen_url": "https://127.0.0.1:9",
                                         "queen_ca_file": str(tmp_path / "missing.pem")}))
    result = subprocess.run([str(BIN / "rbee-hive"), "--check-config", "--config", str(hive_yaml)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{hive_yaml}: queen_ca_file: cannot load the CA bundle" in result.stderr
    queen_yaml = tmp_path / "queen.yaml"
    queen_yaml.write_text(yaml.safe_dump({"http": {"tls_cert_file": tls_files["ca"],
                                                   "tls_key_file": tls_files["key"]}}))
    result = subprocess.run([str(BIN / "rbee-queen"), "--check-config", "--config",
                             str(queen_yaml)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{queen_yaml}: http.tls_cert_file: cannot load the certificate" in result.stderr
