"""Collector plugins: how rbee and third parties add per-worker and per-hive telemetry.

A plugin is a module or object with functions marked ``@rbee.plugin.hookimpl``, declared in its
distribution's metadata under the entry-point group ``rbee.collectors``::

    # setup.py / pyproject.toml of a third-party plugin
    entry_points={"rbee.collectors": ["mystats = mystats_plugin"]}

    # mystats_plugin.py
    from rbee.plugin import hookimpl

    @hookimpl
    def rbee_collect_worker(worker, telemetry):
        telemetry.metrics["mystats.threads"] = count_threads(worker.worker.pid)

The built-in collectors (``rbee.collectors.cgroup``, ``.process``, ``.gpu``) are registered through
that same group. The hooks are specified in ``rbee.plugin.spec``.
"""

import pluggy

PROJECT = "rbee"
ENTRY_POINT_GROUP = "rbee.collectors"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "hookimpl", "hookspec"]
