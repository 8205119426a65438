"""The engine collector in a real hive: real workers in cgroups, each pointing (by ``metrics_url``
or by its launcher's argv) at a real HTTP server on 127.0.0.1 serving an engine's exposition, or
misbehaving as engines and networks do. One bad endpoint costs its worker the engine state and
one ``errors`` entry; nothing else in any record changes, and no tick is late."""

from __future__ import annotations

import stat
import time

import httpx
import pytest
import trio
from rbee.collectors.engine import fetch
from rbee.collectors.engine.engines import EngineError

from rbee.config import CollectorSettings, EngineSettings
from rbee.hive.agent import HiveAgent, free_port

from .conftest import sleeper
from .engineservers import Answer, bump, fixture, metrics_servers
from .hivekit import hive_config

INTERVAL = 0.2
ENGINE = "engine.scraper"


def spec(instance: str, metrics_url: str | None = None, argv: list[str] | None = None) -> dict:
    found = {"group": "llm", "instance": instance, "argv": argv or sleeper()}
    if metrics_url is not None:
        found["metrics_url"] = metrics_url
    return found


def fake_launcher(directory, name: str) -> str:
    """An executable called ``name`` that only sleeps: its argv is what the collector reads."""
    path = directory / name
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


async def until(agent: HiveAgent, predicate, timeout: float = 5.0):
    with trio.fail_after(timeout):
        while True:
            records = {w.instance: w for w in (await agent.wait_changed()).workers}
            if predicate(records):
                return records


async def test_each_worker_gets_its_engine_state_and_bad_endpoints_cost_only_theirs(tmp_path):
    huge = "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n" + "#" * 200_000 + "\n"
    with metrics_servers(fixture("vllm-0.10.0.prom"), fixture("vllm-0.6.3.prom"),
                         "<html><body>It works!</body></html>\n", huge,
                         Answer(huge.encode(), declare_length=False),
                         Answer(fixture("tgi-3.0.prom").encode(), gzip=True),
                         Answer(huge.encode(), gzip=True),
                         Answer(fixture("sglang-0.4.prom").encode(), delay_s=2.0)) as servers:
        vllm, by_argv, garbage, big, big_unannounced, gzipped, gzip_bomb, slow = servers
        vllm.others["/version"] = Answer(b'{"version":"0.10.0"}', content_type="application/json")
        gzipped.others["/info"] = Answer(b'{"model_id":"m","version":"3.0.1","sha":"x"}',
                                         content_type="application/json")
        vllm_binary = fake_launcher(tmp_path, "vllm")
        workers = [
            spec("vllm", vllm.url),
            spec("by-argv", argv=[vllm_binary, "serve", "mistral-7b", "--port", str(by_argv.port)]),
            spec("not-found", vllm.url.replace("/metrics", "/nope")),
            spec("garbage", garbage.url),
            spec("huge", big.url),
            spec("huge-unannounced", big_unannounced.url),
            spec("gzipped", gzipped.url),
            spec("gzip-bomb", gzip_bomb.url),  # would be small on the wire: never asked for
            spec("slow", slow.url),
            spec("unreachable", f"http://127.0.0.1:{free_port()}/metrics"),
            spec("plain"),
        ]
        agent = HiveAgent(hive_config(
            "engine-scrape", workers=workers, heartbeat={"interval_s": INTERVAL},
            collect={"interval_s": INTERVAL, "engine": {"timeout_s": 0.3, "max_bytes": 65536}}))
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            records = await until(agent, lambda r: len(r) == 11 and all(
                r[i].engine or r[i].errors for i in r if i != "plain")
                and r["vllm"].engine is not None and r["vllm"].engine.version is not None)
            ticks_before, started = agent.generation, trio.current_time()
            await trio.sleep(1.0)  # the slow engine (2 s) is being waited on all along
            ticks = agent.generation - ticks_before
            records = {w.instance: w for w in agent.latest.workers}
            nursery.cancel_scope.cancel()
    assert ticks >= 4, f"{ticks} ticks in {trio.current_time() - started:.1f}s of 0.2 s interval"
    assert records["vllm"].engine.engine == "vllm"
    assert (records["vllm"].engine.requests_running, records["vllm"].engine.requests_waiting,
            records["vllm"].engine.kv_cache_pct) == (12, 7, 94.12)
    assert records["by-argv"].engine.requests_running == 3  # found from `vllm serve --port N`
    assert records["gzipped"].engine.engine == "tgi" and records["gzipped"].errors == []
    assert records["vllm"].engine.version == "0.10.0"  # its GET /version, asked once
    assert records["gzipped"].engine.version == "3.0.1"  # TGI's GET /info
    assert records["by-argv"].engine.version is None  # no info endpoint: no version, no error
    assert vllm.paths.count("/version") == 1 and vllm.paths.count("/metrics") > 3  # asked once
    assert records["by-argv"].model == "mistral-7b" and records["by-argv"].errors == []
    problems = {
        "not-found": "HTTP 404 from http://127.0.0.1:",
        "garbage": "no known engine metrics in the exposition",
        "huge": "sent 200057 bytes, over collect.engine.max_bytes (65536)",
        "huge-unannounced": "sent more than 65536 bytes, over collect.engine.max_bytes (65536)",
        "gzip-bomb": "sent 200057 bytes, over collect.engine.max_bytes (65536)",  # identity
        "slow": "no answer from http://127.0.0.1:",
        "unreachable": "cannot read http://127.0.0.1:",
    }
    for instance, problem in problems.items():
        record = records[instance]
        assert record.engine is None, instance
        assert [e.collector for e in record.errors] == [ENGINE], (instance, record.errors)
        assert problem in record.errors[0].message, (instance, record.errors[0].message)
        assert record.rate_window_s > 0 and record.uptime_s >= 0  # the other plugins ran, clean
    assert "within 0.3s" in records["slow"].errors[0].message
    assert records["plain"].engine is None and records["plain"].errors == []
    assert records["vllm"].errors == []


async def test_each_engine_is_read_on_one_kept_alive_connection(monitor):
    """The full reading and the version question share one connection per engine, kept across
    refreshes; the pooled httpx client is not used for a plain http:// engine."""
    with metrics_servers(fixture("vllm-0.10.0.prom"), fixture("vllm-0.10.0.prom")) as servers:
        for index, server in enumerate(servers):
            server.others["/version"] = Answer(b'{"version":"0.10.0"}',
                                               content_type="application/json")
            monitor.spawn("llm", f"v{index}", sleeper(), metrics_url=server.url)
        settings = CollectorSettings(gpu="none", engine=EngineSettings(timeout_s=2.0))
        from rbee.hive.collection import TelemetryCollector
        from rbee.plugin.manager import build_plugin_manager
        collector = TelemetryCollector(monitor, build_plugin_manager(), settings)

        def unused(request: httpx.Request) -> httpx.Response:
            raise AssertionError(f"httpx asked for {request.url}")

        async with httpx.AsyncClient(transport=httpx.MockTransport(unused)) as http:
            for _ in range(3):
                await collector.refresh_workers(http, deadline_s=2.0)
        records = collector.collect_all()
        collector.close()
    assert [r.engine.version for r in records] == ["0.10.0", "0.10.0"]
    for server in servers:
        assert server.paths == ["/metrics", "/metrics", "/version", "/metrics"]
        assert len(set(server.clients)) == 1, server.clients


async def test_through_httpx_a_gzip_bomb_is_counted_unpacked():
    """An ``https://`` endpoint is read through httpx, which asks for gzip: the limit holds on
    the unpacked bytes (plain http asks for identity, above)."""
    huge = "vllm:num_requests_running 1\n" + "#" * 200_000 + "\n"
    with metrics_servers(Answer(huge.encode(), gzip=True),
                         Answer(fixture("tgi-3.0.prom").encode(), gzip=True)) as [bomb, tgi]:
        async with httpx.AsyncClient() as http:
            with pytest.raises(EngineError, match="sent more than 65536 bytes, over "
                                                  r"collect.engine.max_bytes \(65536\)"):
                await fetch(http, bomb.url, 2.0, 65536)
            assert await fetch(http, tgi.url, 2.0, 65536) == fixture("tgi-3.0.prom").encode()


async def test_an_engine_restart_is_an_error_for_one_tick_then_rates_resume():
    first = fixture("llamacpp-b4600.prom")
    with metrics_servers(first) as [server]:
        agent = HiveAgent(hive_config(
            "engine-restart", workers=[spec("llama", server.url)],
            # ticks 4x as often as scrapes: each scrape's outcome is seen by several ticks
            heartbeat={"interval_s": 0.1}, collect={"interval_s": 0.4}))
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await until(agent, lambda r: r["llama"].engine is not None)
            server.serve_text(bump(first, "llamacpp:tokens_predicted_total", -7000))
            records = await until(agent, lambda r: r["llama"].errors != [])
            assert records["llama"].engine is None
            assert "counter generation_tokens went backwards (7801 → 801)" in \
                records["llama"].errors[0].message
            server.serve_text(bump(first, "llamacpp:tokens_predicted_total", -6000))
            records = await until(agent, lambda r: r["llama"].engine is not None
                                  and r["llama"].engine.generation_tokens_s is not None)
            assert records["llama"].errors == []  # counting from the restarted engine's 801
            assert records["llama"].engine.generation_tokens_s >= 0
            nursery.cancel_scope.cancel()


async def test_scrapes_run_concurrently_under_one_deadline(monitor):
    """Twelve engines that each take 0.25 s: one refresh takes about 0.25 s, not 3 s."""
    answers = [Answer(fixture("tgi-3.0.prom").encode(), delay_s=0.25) for _ in range(12)]
    with metrics_servers(*answers) as servers:
        for index, server in enumerate(servers):
            monitor.spawn("tgi", f"t{index}", sleeper(), metrics_url=server.url)
        settings = CollectorSettings(gpu="none", engine=EngineSettings(timeout_s=1.0))
        from rbee.hive.collection import TelemetryCollector
        from rbee.plugin.manager import build_plugin_manager
        collector = TelemetryCollector(monitor, build_plugin_manager(), settings)
        async with httpx.AsyncClient() as http:
            started = time.monotonic()
            await collector.refresh_workers(http, deadline_s=2.0)
            took = time.monotonic() - started
        records = collector.collect_all()
        collector.close()
    assert took < 1.0, f"took {took:.2f}s"
    assert sorted(r.engine.requests_running for r in records) == [9] * 12
    assert all(r.errors == [] for r in records)


async def test_spawned_with_metrics_url_through_the_hive_api_to_the_queen(tmp_path):
    """The whole path with real daemons: POST /v1/workers with a metrics_url → the hive scrapes
    the engine → the heartbeat → the queen's /v1/workers filters and its stream."""
    from .queenkit import open_stream
    from .test_end_to_end import hive, queen

    with metrics_servers(fixture("vllm-0.10.0.prom")) as [server], queen(tmp_path) as q, \
            hive(tmp_path, "engine-e2e", q.url) as h:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as client:
            response = await client.post(f"{h.url}/v1/workers", json={
                "group": "llm", "instance": "v", "argv": sleeper(), "metrics_url": server.url})
            assert response.status_code == 201, response.text
            async with open_stream(client, q.url) as stream:
                event = await stream.until(lambda e: any(  # running: schedulable
                    w.engine is not None and w.state == "running"
                    for w in getattr(e, "workers", [])), timeout=10)
            (record,) = event.workers
            assert (record.engine.requests_running, record.engine.kv_cache_pct) == (12, 94.12)
            found = (await client.get(f"{q.url}/v1/workers",
                                      params={"max_waiting": "7", "max_kv_cache_pct": "95"})).json()
            assert [w["worker"]["instance"] for w in found] == ["v"]
            assert (await client.get(f"{q.url}/v1/workers",
                                     params={"max_waiting": "6"})).json() == []
            assert (await client.get(f"{q.url}/v1/workers", params={"idle": "true"})).json() == []
