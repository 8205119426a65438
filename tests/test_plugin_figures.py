"""Plugin figures in ``/metrics`` (``rbee.plugin_figures`` through ``rbee.exposition``): a family
per declared figure with the plugin's help and unit, counters as counters, rates as gauges,
undeclared keys in one ``rbee_plugin_metric`` family, a disagreeing second declaration folded
into the first; rbee's fast writer and the prometheus-client collector give the same samples and
the OpenMetrics text passes the strict parser (``# UNIT`` included)."""

from __future__ import annotations

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from rbee.contract import HiveRecord, MetricSpec, PluginInfo
from rbee.exposition import FleetCollector, fleet_text
from rbee.scrape import render

from .builders import heartbeat, worker
from .test_exposition import samples

CTXSW = PluginInfo(name="ctx-sw", distribution="rbee-ctxsw", version="1.2", metrics=[
    MetricSpec(name="switches", kind="counter", as_rate=True, help="Context switches"),
    MetricSpec(name="procs", help='Processes, "all" of them\\ (\n new line)'),
    MetricSpec(name="oom_kills", kind="counter", help="OOM kills"),
    MetricSpec(name="cpu_time", kind="counter", unit="seconds", help="CPU time"),
    MetricSpec(name="page_cache", unit="bytes", help="Page cache"),
])


def fleet() -> list[HiveRecord]:
    figures = {"ctx-sw.switches": 12.5, "ctx-sw.procs": 3.0, "ctx-sw.oom_kills": 1.0,
               "ctx-sw.cpu_time": 4.25, "ctx-sw.page_cache": 2.0**30, "other.thing": -1.5}
    new = heartbeat("new", [worker("w0", metrics=figures), worker("w1", model="m")])
    new = msgspec.structs.replace(new, hive=msgspec.structs.replace(new.hive, plugins=[CTXSW]))
    old = heartbeat("old", [worker("w0", metrics={"ctx-sw.procs": 7.0})])  # sends no declarations
    other = msgspec.structs.replace(CTXSW, metrics=[MetricSpec(name="procs", kind="counter")])
    third = heartbeat("third", [worker("w9", metrics={"ctx-sw.procs": 9.0})])
    third = msgspec.structs.replace(third, hive=msgspec.structs.replace(third.hive,
                                                                        plugins=[other]))
    return [HiveRecord(info=h.hive, workers=h.workers, gpus=h.capabilities)
            for h in (new, old, third)]


def plugin_samples(text: str) -> dict[tuple, float]:
    return {(name, labels): value for name, labels, value in samples(parse_text(text))
            if name.startswith("rbee_plugin_")}


def test_a_family_per_declared_figure_with_its_help_kind_and_unit():
    text = fleet_text(fleet(), openmetrics=False)
    labels = (("group", "llm"), ("hive", "new"), ("instance", "w0"), ("model", "llama-3-8b"))
    assert plugin_samples(text) == {
        ("rbee_plugin_ctx_sw_switches_per_second", labels): 12.5,
        ("rbee_plugin_ctx_sw_procs", labels): 3.0,
        ("rbee_plugin_ctx_sw_oom_kills_total", labels): 1.0,
        ("rbee_plugin_ctx_sw_cpu_time_seconds_total", labels): 4.25,
        ("rbee_plugin_ctx_sw_page_cache_bytes", labels): 2.0**30,
        ("rbee_plugin_metric", (("group", "llm"), ("hive", "new"), ("instance", "w0"),
                                ("key", "other.thing"), ("model", "llama-3-8b"))): -1.5,
        ("rbee_plugin_metric", (("group", "llm"), ("hive", "old"), ("instance", "w0"),
                                ("key", "ctx-sw.procs"), ("model", "llama-3-8b"))): 7.0,
        ("rbee_plugin_ctx_sw_procs", (("group", "llm"), ("hive", "third"), ("instance", "w9"),
                                      ("model", "llama-3-8b"))): 9.0,  # the first declaration
    }
    assert ("# HELP rbee_plugin_ctx_sw_switches_per_second Context switches (plugin ctx-sw)\n"
            "# TYPE rbee_plugin_ctx_sw_switches_per_second gauge\n") in text
    assert ("# HELP rbee_plugin_ctx_sw_oom_kills_total OOM kills (plugin ctx-sw)\n"
            "# TYPE rbee_plugin_ctx_sw_oom_kills_total counter\n") in text
    families = {f.name: f for f in parse_text(text)}
    assert families["rbee_plugin_ctx_sw_procs"].documentation == (
        'Processes, "all" of them\\ ( new line) (plugin ctx-sw)')


def test_fast_writer_and_collector_agree_and_openmetrics_is_strict():
    hives = fleet()
    registry = CollectorRegistry()
    registry.register(FleetCollector(lambda: hives))
    collector = samples(parse_text(generate_latest(registry).decode()))
    fast = samples(parse_text(fleet_text(hives, openmetrics=False)))
    assert fast == collector
    body, _ = render(CollectorRegistry(), "application/openmetrics-text; version=1.0.0",
                     lambda: hives)
    text = body.decode()
    strict = {f.name: f for f in parse_openmetrics(text)}  # raises on any violation
    assert strict["rbee_plugin_ctx_sw_page_cache_bytes"].unit == "bytes"
    assert strict["rbee_plugin_ctx_sw_cpu_time_seconds"].type == "counter"
    assert strict["rbee_plugin_ctx_sw_cpu_time_seconds"].unit == "seconds"
    assert strict["rbee_plugin_ctx_sw_procs"].documentation.startswith('Processes, "all"')
    assert samples(strict.values()) == fast


def test_no_plugin_figures_no_plugin_families():
    plain = heartbeat("plain", [worker("w0")])
    text = fleet_text([HiveRecord(info=plain.hive, workers=plain.workers, gpus=[])], False)
    assert "rbee_plugin" not in text
