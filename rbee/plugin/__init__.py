"""Collector plugins: how rbee and third parties add per-worker and per-hive telemetry.

The public plugin API is what this module exports (``__all__``), pinned by a test and versioned by
``API_VERSION``: the markers, the ``WorkerView`` a hook receives, the raw ``StatSample`` it holds,
and the hook specifications in ``rbee.plugin.spec``. A plugin is a module or object with functions
marked ``@rbee.plugin.hookimpl``, declared in its distribution's metadata under the entry-point
group ``rbee.collectors``::

    # pyproject.toml of a third-party plugin
    [project.entry-points."rbee.collectors"]
    mystats = "mystats_plugin"

    # mystats_plugin.py
    from rbee.plugin import hookimpl

    @hookimpl
    def rbee_collect_worker(worker, telemetry):
        telemetry.metrics["mystats.threads"] = count_threads(worker.pid)

A plugin declares the figures it adds (``rbee_declare_metrics``: ``MetricSpec`` name, kind,
unit, help, ``as_rate``) so that they get families of their own in ``/metrics``, and may take a
section of hive.yaml (``rbee_plugin_settings``: a ``PluginSettings`` subclass). Every type a hook
signature names is exported here; ``rbee.plugin.testing`` runs a plugin in a unit test. The guide
is docs/plugins.md.

The built-in collectors (``rbee.collectors.cgroup``, ``.process``, ``.gpu``, ``.engine``) are
registered through that same group and use nothing else. ``RBEE_DISABLE_PLUGINS=a,b`` skips
plugins by name; ``RBEE_TRACE_PLUGINS=1`` logs every hook call with its duration.
"""

import pluggy

from .._sample import StatSample
from ..config import CollectorSettings
from ..contract import (
    CollectorIssue,
    GpuDevice,
    MetricKind,
    MetricSpec,
    PluginInfo,
    WorkerGpuUse,
    WorkerTelemetry,
)
from ._view import WorkerView

API_VERSION = "1.1"
"""Major.minor of the plugin API: the minor grows when a hook or a ``WorkerView`` field is added,
the major when one changes or goes. 1.0: ``WorkerView`` replaced the hive's internal
``WorkerSample``; ``rbee_refresh_workers`` added. 1.1: ``rbee_declare_metrics``,
``rbee_plugin_settings``, ``rbee_collector_setup``'s ``config`` and ``WorkerView.cgroup_paths``
added."""

PROJECT = "rbee"
ENTRY_POINT_GROUP = "rbee.collectors"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

from .declarations import PluginSettings  # noqa: E402  (it needs the markers above)

__all__ = [
    "API_VERSION",
    "ENTRY_POINT_GROUP",
    "PROJECT",
    "CollectorIssue",
    "CollectorSettings",
    "GpuDevice",
    "MetricKind",
    "MetricSpec",
    "PluginInfo",
    "PluginSettings",
    "StatSample",
    "WorkerGpuUse",
    "WorkerTelemetry",
    "WorkerView",
    "hookimpl",
    "hookspec",
]
