"""The plugin's own unit tests, through rbee's testing kit (``rbee.plugin.testing``)."""

import pytest
import rbee_plugin_example

from rbee import ConfigError
from rbee.plugin.testing import PluginHarness


def test_threads_fds_and_peak_memory_of_this_process():
    record = PluginHarness(rbee_plugin_example, name="example").collect()
    assert record.metrics["example.threads"] >= 1 and record.metrics["example.open_fds"] >= 3
    assert record.metrics["example.peak_rss"] > 2**20


def test_context_switches_become_a_rate_after_a_window():
    harness = PluginHarness(rbee_plugin_example, name="example")
    worker = harness.worker()
    assert "example.context_switches" not in harness.collect(worker).metrics  # no window yet
    harness.clock.advance(1.0)
    assert harness.collect(worker).metrics["example.context_switches"] >= 0


def test_its_config_section():
    harness = PluginHarness(rbee_plugin_example, name="example", config={"count_fds": False})
    assert "example.open_fds" not in harness.collect().metrics
    with pytest.raises(ConfigError, match=r"plugins\.example: .*unknown field `count_fd`"):
        PluginHarness(rbee_plugin_example, name="example", config={"count_fd": False})
