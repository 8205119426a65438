"""An example rbee collector plugin: threads, open file descriptors, peak resident memory and
context switches per second of each worker, written as docs/plugins.md says.

It uses only the public plugin API (``rbee.plugin``, API ``1.x``, 1.1 for declarations and its
config section): the ``WorkerView`` it is given (``worker.pids()``: every process in the worker's
cgroup) and the record it fills. Its figures go under ``telemetry.metrics`` as
``example.threads``, ``example.open_fds``, ``example.peak_rss`` and ``example.context_switches``
and reach the hive's and the queen's ``/metrics`` (``rbee_plugin_example_threads``,
``rbee_plugin_example_peak_rss_bytes`` ...), ``/v1/workers`` and the stream.
``context_switches`` is declared a counter ``as_rate``: the plugin stores the count, the hive
sends switches per second.

Its section of hive.yaml (``plugins: {example: {count_fds: false}}``) is checked by
``ExampleSettings``. To show that rbee isolates a failing plugin, it raises for a worker whose
command line holds ``crash_marker`` (``--example-crash``): that worker gets an ``errors`` entry
from ``example``, nothing else changes.
"""

from __future__ import annotations

import os

from rbee.plugin import API_VERSION, MetricSpec, PluginSettings, hookimpl

if not API_VERSION.startswith("1.") or API_VERSION == "1.0":
    raise ImportError(f"rbee-plugin-example needs rbee plugin API 1.1 or later 1.x, not "
                      f"{API_VERSION}")


class ExampleSettings(PluginSettings):
    """``plugins: {example: {...}}`` in hive.yaml."""

    count_fds: bool = True
    """Count open file descriptors (a directory listing per process per tick)."""
    crash_marker: str = "--example-crash"
    """A worker whose argv holds this makes the plugin raise (to show isolation)."""


_settings = ExampleSettings()


@hookimpl
def rbee_plugin_settings() -> type[ExampleSettings]:
    return ExampleSettings


@hookimpl
def rbee_declare_metrics() -> list[MetricSpec]:
    return [
        MetricSpec(name="threads", help="Threads of the worker's processes"),
        MetricSpec(name="open_fds", help="File descriptors the worker's processes hold open"),
        MetricSpec(name="peak_rss", unit="bytes",
                   help="Peak resident memory of the worker's processes, summed (VmHWM)"),
        MetricSpec(name="context_switches", kind="counter", as_rate=True,
                   help="Context switches of the worker's processes, voluntary or not"),
    ]


@hookimpl
def rbee_collector_setup(config: ExampleSettings) -> None:
    global _settings
    _settings = config


def _status(pid: int) -> tuple[int, int, int]:
    """Threads, context switches and peak resident bytes of one process (/proc/<pid>/status)."""
    threads = switches = peak = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "Threads":
                threads = int(value)
            elif key.endswith("ctxt_switches"):  # voluntary_ and nonvoluntary_
                switches += int(value)
            elif key == "VmHWM":  # "1234 kB"
                peak = int(value.split()[0]) * 1024
    return threads, switches, peak


@hookimpl
def rbee_collect_worker(worker, telemetry) -> None:
    if _settings.crash_marker in worker.argv:
        raise RuntimeError("example plugin: crashing on purpose for this worker")
    threads = fds = switches = peak = 0
    for pid in worker.pids():
        try:
            process_threads, process_switches, process_peak = _status(pid)
            if _settings.count_fds:
                fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
        threads += process_threads
        switches += process_switches
        peak += process_peak
    telemetry.metrics["example.threads"] = float(threads)
    telemetry.metrics["example.peak_rss"] = float(peak)
    telemetry.metrics["example.context_switches"] = float(switches)
    if _settings.count_fds:
        telemetry.metrics["example.open_fds"] = float(fds)
