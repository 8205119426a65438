"""The hooks a collector plugin may implement. Every one is optional.

Per-worker calls are isolated: rbee calls each plugin's ``rbee_collect_worker`` on its own, so a
plugin that raises for one worker is recorded in that worker's ``errors`` and neither the other
plugins nor the other workers are affected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import hookspec

if TYPE_CHECKING:
    import pluggy

    from ..config import CollectorSettings
    from ..hive.collection import WorkerSample
    from ..telemetry import GpuDevice, WorkerTelemetry

__all__ = [
    "rbee_collect_worker",
    "rbee_collector_setup",
    "rbee_collector_teardown",
    "rbee_refresh_devices",
    "rbee_sample_devices",
]


@hookspec
def rbee_collector_setup(settings: CollectorSettings, plugin_manager: pluggy.PluginManager) -> None:
    """Called once when a hive starts collecting, before any other hook.

    :param settings: the ``collect`` section of the hive configuration.
    :param plugin_manager: a plugin that keeps state per hive creates it here and registers the
        stateful object with ``plugin_manager.register(obj, name=...)``.
    Returns nothing; all implementations are called.
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
def rbee_collect_worker(worker: WorkerSample, telemetry: WorkerTelemetry) -> None:
    """Fill in fields of one worker's record for this tick. Must not block.

    :param worker: the worker (``worker.worker``: pid, argv, limits …) with this tick's raw stat
        sample, the previous one, and the seconds between them.
    :param telemetry: the record being built; set its fields, add ``errors``, or add numbers to
        ``telemetry.metrics`` under ``"<plugin>.<metric>"``.
    Returns nothing; every plugin is called, each in isolation (see module docstring).
    """
