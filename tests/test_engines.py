"""Engine metrics: each engine's real exposition text (tests/engine_fixtures/, one per engine and
version, their headers say where the names come from) mapped onto one EngineState; rates from
counter deltas, time-to-first-token percentiles from bucket deltas; bad text refused by name."""

from __future__ import annotations

import pytest
from rbee.collectors.engine.engines import EngineError, EngineTracker, parse_exposition
from rbee.collectors.engine.launchers import metrics_url_from_argv

from rbee.contract import EngineState, WorkerTelemetry, encode

from .engineservers import FIXTURES, bump, fixture, observe

# fixture: (engine, running, waiting, KV %, prompt counter, generation counter, preemptions counter,
#           TTFT histogram)
ENGINES = {
    "vllm-0.10.0.prom": ("vllm", 12, 7, 94.12, "vllm:prompt_tokens_total",
                         "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                         "vllm:time_to_first_token_seconds"),
    "vllm-0.6.3.prom": ("vllm", 3, 0, 31.68, "vllm:prompt_tokens_total",
                        "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                        "vllm:time_to_first_token_seconds"),
    "sglang-0.4.prom": ("sglang", 162, 2826, 28.0, "sglang:prompt_tokens_total",
                        "sglang:generation_tokens_total", None,
                        "sglang:time_to_first_token_seconds"),
    "tgi-3.0.prom": ("tgi", 9, 4, None, "tgi_request_input_length_sum",
                     "tgi_request_generated_tokens_sum", None, None),
    "llamacpp-b4600.prom": ("llamacpp", 2, 1, 41.31, "llamacpp:prompt_tokens_total",
                            "llamacpp:tokens_predicted_total", None, None),
    "llamacpp-master.prom": ("llamacpp", 1, 0, None, "llamacpp:prompt_tokens_total",
                             "llamacpp:tokens_predicted_total", None, None),
}


def test_every_fixture_is_covered():
    assert sorted(p.name for p in FIXTURES.glob("*.prom")) == sorted(ENGINES)
    for name in ENGINES:
        assert fixture(name).startswith("# rbee test fixture: "), name  # says where it is from


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_first_reading_gauges(name):
    engine, running, waiting, kv_pct, *_ = ENGINES[name]
    state = EngineTracker().update(parse_exposition(fixture(name), 100.0))
    assert state == EngineState(engine=engine, requests_running=running,
                                requests_waiting=waiting, kv_cache_pct=kv_pct)


def test_vllm_reads_the_older_kv_gauge_only_when_the_newer_is_absent():
    newer = fixture("vllm-0.10.0.prom")
    assert "vllm:kv_cache_usage_perc{" in newer and "vllm:gpu_cache_usage_perc{" in newer
    changed = bump(newer, "vllm:gpu_cache_usage_perc", -0.5)  # the deprecated one now differs
    assert parse_exposition(changed, 0).kv_cache_fraction == pytest.approx(0.9412)
    assert "vllm:kv_cache_usage_perc" not in fixture("vllm-0.6.3.prom")
    assert parse_exposition(fixture("vllm-0.6.3.prom"), 0).kv_cache_fraction == pytest.approx(0.3168)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_rates_are_counter_deltas_over_time(name):
    _, _, _, _, prompt, generation, preemptions, _ = ENGINES[name]
    first = fixture(name)
    later = bump(bump(first, prompt, 1000), generation, 500)
    if preemptions:
        later = bump(later, preemptions, 2)
    tracker = EngineTracker()
    tracker.update(parse_exposition(first, 100.0))
    state = tracker.update(parse_exposition(later, 102.0))
    assert (state.prompt_tokens_s, state.generation_tokens_s) == (500.0, 250.0)
    assert state.preemptions_s == (1.0 if preemptions else None)
    assert state.rate_window_s == 2.0


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_ttft_percentiles_from_bucket_deltas_over_the_window(name):
    *_, histogram = ENGINES[name]
    first = fixture(name)
    tracker = EngineTracker(ttft_window_s=60)
    tracker.update(parse_exposition(first, 100.0))
    if histogram is None:  # TGI and llama.cpp publish no time-to-first-token histogram
        assert tracker.update(parse_exposition(first, 101.0)).ttft_p50_s is None
        return
    # 10 requests at 0.3 s (bucket 0.25..0.5) and 10 at 0.9 s (0.75..1.0): the engine's history
    # before the window (thousands of requests) must not count.
    later = observe(observe(first, histogram, 0.3, 10), histogram, 0.9, 10)
    state = tracker.update(parse_exposition(later, 101.0))
    assert (state.ttft_p50_s, state.ttft_p95_s) == (0.5, 0.975)
    # 70 s on with nothing new: the window holds no request, so no percentiles
    tracker.update(parse_exposition(later, 140.0))
    assert tracker.update(parse_exposition(later, 171.0)).ttft_p50_s is None


def test_a_counter_going_backwards_is_an_error_then_counting_restarts():
    first = fixture("vllm-0.10.0.prom")
    tracker = EngineTracker()
    tracker.update(parse_exposition(first, 100.0))
    restarted = bump(first, "vllm:generation_tokens_total", -400000)
    with pytest.raises(EngineError, match="counter generation_tokens went backwards "
                                          r"\(412977 → 12977\): engine restarted\?"):
        tracker.update(parse_exposition(restarted, 101.0))
    state = tracker.update(parse_exposition(bump(restarted, "vllm:generation_tokens_total", 30),
                                            102.0))
    assert state.generation_tokens_s == 30.0


@pytest.mark.parametrize("text, message", [
    ("", "no known engine metrics in the exposition"),
    ("<html><body>It works!</body></html>\n", "no known engine metrics in the exposition"),
    ('vllm:num_requests_running{model_name="m" 3\nvllm:num_requests_waiting 0\n',
     "malformed vllm metrics"),
    ("vllm:num_requests_running 3 three\nvllm:num_requests_waiting 0\n", "malformed vllm metrics"),
    ("vllm:num_requests_running 3\n", "vllm metrics lack vllm:num_requests_waiting"),
    ("vllm:num_requests_running 3\nvllm:num_requests_waiting NaN\n",
     "not a finite non-negative number"),
    ("sglang:num_running_reqs -1\nsglang:num_queue_reqs 0\n", "not a finite non-negative"),
    ('vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n'
     'vllm:time_to_first_token_seconds_bucket{le="0.1"} 3\n', "has no +Inf bucket"),
])
def test_bad_expositions_are_refused_by_name(text, message):
    with pytest.raises(EngineError, match=message.replace("+", r"\+")):
        parse_exposition(text, 0.0)


def test_series_seen_last_scrape_give_the_same_reading_as_a_full_parse():
    text = fixture("vllm-0.10.0.prom")
    series: dict = {}
    assert parse_exposition(text, 1.0, series) == parse_exposition(text, 1.0)
    assert len(series) == 30 and all(s.startswith("vllm:") for s in series)
    later = observe(bump(text, "vllm:num_requests_waiting", 5),
                    "vllm:time_to_first_token_seconds", 0.3, 10)
    assert parse_exposition(later, 2.0, series) == parse_exposition(later, 2.0)
    broken = bump(later, "vllm:num_requests_running", 0).replace(" 12.0\n", " twelve\n", 1)
    with pytest.raises(EngineError, match="malformed vllm metrics"):  # a known series, bad value
        parse_exposition(broken, 3.0, series)


def test_several_label_sets_are_summed_and_kv_is_the_fullest():
    text = ('vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 3\n'
            'vllm:num_requests_waiting{engine="0"} 1\nvllm:num_requests_waiting{engine="1"} 0\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.7\n')
    reading = parse_exposition(text, 0.0)
    assert (reading.running, reading.waiting, reading.kv_cache_fraction) == (5, 1, 0.7)


def test_engine_state_on_the_wire_only_when_known():
    record = WorkerTelemetry(pid=1, group="g", instance="i", cpu_pct=0, rss_mb=0, io_r_mb_s=0,
                             io_w_mb_s=0, uptime_s=0, gpu_util_pct=0, vram_mb=0, total_vram_mb=0,
                             model=None)
    assert b'"engine"' not in encode(record)
    record.engine = EngineState(engine="vllm", requests_running=1, requests_waiting=2)
    assert b'"engine":{"engine":"vllm","requests_running":1,"requests_waiting":2}' in encode(record)


@pytest.mark.parametrize("argv, url", [
    (["vllm", "serve", "meta-llama/Llama-3.1-8B", "--port", "8100"], "http://127.0.0.1:8100/metrics"),
    (["/opt/venv/bin/vllm", "serve", "m", "--port=8200", "--host", "0.0.0.0"],
     "http://127.0.0.1:8200/metrics"),
    (["vllm", "serve", "m"], "http://127.0.0.1:8000/metrics"),
    (["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--port", "9"],
     "http://127.0.0.1:9/metrics"),
    (["python", "-m", "sglang.launch_server", "--model-path", "m", "--port", "30001",
      "--enable-metrics"], "http://127.0.0.1:30001/metrics"),
    (["python", "-m", "sglang.launch_server", "--model-path", "m", "--port", "30001"], None),
    (["text-generation-launcher", "--model-id", "m", "-p", "3001"], "http://127.0.0.1:3001/metrics"),
    (["text-generation-launcher", "--port", "80", "--prometheus-port", "9001"],
     "http://127.0.0.1:9001/metrics"),
    (["text-generation-launcher", "--hostname", "10.0.0.5"], "http://10.0.0.5:3000/metrics"),
    (["llama-server", "-m", "/m.gguf", "--port", "8081", "--metrics"],
     "http://127.0.0.1:8081/metrics"),
    (["llama-server", "-m", "/m.gguf", "--host", "::1", "--metrics"], "http://[::1]:8080/metrics"),
    (["llama-server", "-m", "/m.gguf", "--port", "8081"], None),
    (["vllm", "serve", "m", "--port", "eighty"], None),
    (["vllm", "chat"], None),
    (["python3", "-m", "http.server", "8000"], None),
    ([], None),
])
def test_metrics_url_from_launcher_argv(argv, url):
    assert metrics_url_from_argv(argv) == url
