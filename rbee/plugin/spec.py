"""The hooks a collector plugin may implement (API version ``rbee.plugin.API_VERSION``). Every
one is optional; none is ``firstresult``: every implementation is called.

Isolation: rbee calls each plugin's implementation on its own (a pluggy hook caller per plugin;
the per-worker hook, run for every worker every tick, calls the implementation as pluggy's loop
would unless hook calls are monitored, ``rbee.plugin.manager``), so a plugin that raises for one
worker costs that worker the plugin's fields and one entry in its ``errors``; neither the other
plugins nor the other workers are affected.

Wrappers (``wrapper=True`` or ``hookwrapper=True``) are refused at registration with a
``PluginError``: each plugin runs on its own, so there is nothing for a wrapper to wrap, and a
wrapper that silently never ran would be worse than none.

Budget: the per-worker hook runs inside the collection tick. A plugin whose calls in one tick add
up to more than ``collect.plugin_budget_ms`` is skipped for the rest of that tick (the workers it
missed get an ``errors`` entry saying so), so no plugin makes a tick late. Slow work (network,
devices) belongs in ``rbee_refresh_devices`` (a thread) or ``rbee_refresh_workers`` (async), whose
results the per-worker hook reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING

from . import hookspec

if TYPE_CHECKING:
    import httpx
    import msgspec
    import pluggy

    from ..config import CollectorSettings
    from ..contract import GpuDevice, MetricSpec, WorkerTelemetry
    from ._view import WorkerView

__all__ = [
    "rbee_collect_worker",
    "rbee_collector_setup",
    "rbee_collector_teardown",
    "rbee_declare_metrics",
    "rbee_plugin_settings",
    "rbee_refresh_devices",
    "rbee_refresh_workers",
    "rbee_sample_devices",
]


@hookspec
def rbee_declare_metrics() -> Sequence[MetricSpec]:
    """The figures this plugin puts in ``telemetry.metrics``, one ``rbee.plugin.MetricSpec``
    each (``name`` without the ``<plugin>.`` prefix the record's keys carry). Declared figures
    get a family of their own in ``/metrics`` (hive and queen) with this help text and unit; a
    counter with ``as_rate=True`` is turned into a per-second rate by the hive. Called once, when
    the plugin is loaded (``--check-config`` too); a bad declaration is a ``PluginError``.
    """


@hookspec
def rbee_plugin_settings() -> type[msgspec.Struct]:
    """The struct (``rbee.plugin.PluginSettings`` subclass) that validates this plugin's section
    ``plugins: {<plugin>: {...}}`` in hive.yaml. The hive converts the section (absent: ``{}``,
    so every field needs a default or the section becomes required) and hands the instance to
    ``rbee_collector_setup`` as ``config``; an unknown key or a bad value is a config error naming
    the plugin and the key, at start-up and by ``rbee-hive --check-config``. A plugin that
    implements no such hook takes no section.
    """


@hookspec
def rbee_collector_setup(settings: CollectorSettings, plugin_manager: pluggy.PluginManager,
                         config: msgspec.Struct | None) -> None:
    """Called once when a hive starts collecting, before any other hook.

    :param settings: the ``collect`` section of the hive configuration.
    :param plugin_manager: a plugin that keeps state per hive creates it here and registers the
        stateful object with ``plugin_manager.register(obj, name=...)``.
    :param config: this plugin's own ``plugins.<name>`` section, validated by the struct its
        ``rbee_plugin_settings`` returns; None for a plugin without one.
    Returns nothing; all implementations are called, each with its own ``config``.
    """


@hookspec
def rbee_collector_teardown() -> None:
    """Called once when the hive stops collecting; release devices and handles. All are called."""


@hookspec
def rbee_refresh_devices() -> list[GpuDevice]:
    """Query hive-wide state (GPUs, per-process GPU use) once per collection tick.

    May block: it runs in a worker thread, never on the event loop, under the
    ``collect.refresh_timeout_s`` deadline. The devices returned by all implementations are
    concatenated into the heartbeat's ``capabilities``. Return ``[]`` when there is nothing.
    """


@hookspec
def rbee_sample_devices() -> None:
    """Slow hive-wide sampling (per-process GPU utilisation, driver events) once per tick.

    Runs in a worker thread of its own, concurrently with ``rbee_refresh_devices`` and never on
    the tick's path, under the ``collect.refresh_timeout_s`` deadline. Keep what it reads for the
    per-worker hook. All implementations are called; returns nothing.
    """


@hookspec
def rbee_refresh_workers(workers: Sequence[WorkerView], http: httpx.AsyncClient
                         ) -> Awaitable[None] | None:
    """Refresh per-worker state that needs I/O (an engine's metrics endpoint), asynchronously.

    Implement it as ``async def``: the hive calls it once every ``collect.interval_s`` (or as soon
    as the previous call ends, if that took longer) in its own trio task, apart from the
    collection tick, awaits every plugin's coroutine concurrently, and cancels one still running
    after ``collect.refresh_timeout_s``. Keep results in each worker's
    ``worker.state(<your plugin name>)``; the per-worker hook reads them on the next tick. Raising
    is recorded in the hive's health (degraded) and the next interval calls it again.

    :param workers: a view of every worker the hive has now.
    :param http: the hive's shared ``httpx.AsyncClient`` (a small connection pool per origin,
        kept across calls, closed by the hive); give each request its own timeout.
    Returns a coroutine (or None for nothing to do); all implementations are called.
    """


@hookspec
def rbee_collect_worker(worker: WorkerView, telemetry: WorkerTelemetry) -> None:
    """Fill in fields of one worker's record for this tick. Must not block.

    :param worker: a read-only ``rbee.plugin.WorkerView`` of the worker: identity, PIDs, argv,
        cgroup path, start time, limits, GPUs given, metrics URL, this tick's raw counters, and
        a per-plugin ``state(owner)`` slot that lasts the worker's life.
    :param telemetry: the record being built; set its fields, add ``errors``, or add numbers to
        ``telemetry.metrics`` under ``"<plugin>.<metric>"``.
    Returns nothing; every plugin is called, each in isolation, within its per-tick budget.
    """
