"""Collector plugins load through the ``rbee.collectors`` entry points, built-ins and third
parties alike. The third-party plugin here is a real distribution (dist-info with
entry_points.txt) put on sys.path, found by importlib.metadata exactly as an installed one is."""

from __future__ import annotations

import inspect
import sys

import pytest

from rbee.config import CollectorSettings
from rbee.hive.collection import TelemetryCollector
from rbee.plugin import spec
from rbee.plugin.manager import build_plugin_manager

from .conftest import sleeper

PLUGIN_SOURCE = '''
from rbee.plugin import hookimpl

@hookimpl
def rbee_collect_worker(worker, telemetry):
    telemetry.metrics["threads.count"] = float(len(open(f"/proc/{worker.pid}/status")
                                               .read().split("Threads:")[1].split()[0]))
'''


@pytest.fixture
def third_party_distribution(tmp_path, monkeypatch):
    (tmp_path / "rbee_threads_plugin.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "rbee_threads_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: rbee-threads-plugin\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[rbee.collectors]\nthreads = rbee_threads_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "threads"
    sys.modules.pop("rbee_threads_plugin", None)


def test_builtins_come_from_the_entry_points():
    manager = build_plugin_manager()
    names = {dist.project_name for _, dist in manager.list_plugin_distinfo()}
    assert names == {"rbee-telemetry"}
    assert {"cgroup", "process", "gpu"} <= {name for name, _ in manager.list_name_plugin()}


def test_third_party_plugin_metrics_reach_the_record(third_party_distribution, monitor):
    monitor.spawn("llm", "t", sleeper())
    manager = build_plugin_manager()
    assert manager.get_plugin(third_party_distribution) is not None
    collector = TelemetryCollector(monitor, manager, CollectorSettings(gpu="none"))
    [record] = collector.collect_all()
    assert record.metrics == {"threads.count": 1.0}


def test_disabling_plugins_by_name(third_party_distribution, monkeypatch):
    monkeypatch.setenv("RBEE_DISABLE_PLUGINS", "threads,gpu")
    manager = build_plugin_manager()
    assert manager.get_plugin("threads") is None and manager.get_plugin("gpu") is None
    assert manager.get_plugin("cgroup") is not None


def test_every_hook_is_documented_with_its_signature():
    for name in spec.__all__:
        function = getattr(spec, name)
        assert function.__doc__ and len(function.__doc__.strip()) > 40, name
        documented = set(inspect.signature(function).parameters)
        assert all(f":param {p}:" in function.__doc__ for p in documented), name


@pytest.mark.parametrize("argv, model", [
    (["vllm", "serve", "--model", "llama-3-8b"], "llama-3-8b"),
    (["/opt/bin/vllm", "serve", "Qwen/Qwen3-8B", "--port", "8001"], "Qwen/Qwen3-8B"),
    (["worker", "--model=mistral-7b"], "mistral-7b"),
    (["llama-server", "-m", "/models/qwen.gguf", "--port", "1"], "/models/qwen.gguf"),
    (["python3", "-u", "-m", "vllm.entrypoints.api_server", "--model", "phi-3"], "phi-3"),
    (["python3", "-m", "rbee.demo.worker", "-m", "bge"], "bge"),
    (["python3", "-m", "http.server"], None),
    (["python3", "serve.py", "-m", "tiny"], "tiny"),
    (["worker", "-m", "short", "--model", "long"], "long"),
    (["worker", "--model"], None),
    ([], None),
])
def test_model_from_command_line(argv, model):
    from rbee.collectors.process import model_from_argv

    assert model_from_argv(tuple(argv)) == model
