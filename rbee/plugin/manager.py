"""Builds the plugin manager: hook specs, then every plugin under the ``rbee.collectors`` entry
points (built-ins included), minus those named in ``RBEE_DISABLE_PLUGINS`` or the config.

``PluginHooks`` is how the hive calls them: one pluggy hook caller per plugin and hook, so each
plugin stays isolated. The per-worker hook, called for every worker every tick, calls each
implementation as pluggy's own loop does (``function(*args)``: rbee refuses wrappers, so there is
nothing else to run) while nobody monitors the manager, and through pluggy's caller whenever
someone does (``RBEE_TRACE_PLUGINS``, ``add_hookcall_monitoring``, ``enable_tracing``): pluggy's
bookkeeping around a call costs 2 µs, more than the built-in plugins themselves.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

import pluggy

from .._errors import PluginError
from . import ENTRY_POINT_GROUP, PROJECT, spec

trace_log = logging.getLogger("rbee.plugin.trace")


class RbeePluginManager(pluggy.PluginManager):
    """A pluggy manager that refuses hook wrappers at registration (see ``rbee.plugin.spec``)."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(spec)
        self.monitors = 0
        """Hook-call monitors in place (tracing included): while any is, every call goes
        through pluggy's caller so that they see it."""

    def add_hookcall_monitoring(self, before, after) -> Callable[[], None]:
        undo = super().add_hookcall_monitoring(before, after)
        self.monitors += 1

        def undo_and_count() -> None:
            undo()
            self.monitors -= 1

        return undo_and_count

    def register(self, plugin: object, name: str | None = None) -> str | None:
        registered = super().register(plugin, name)
        if registered is None:  # blocked
            return None
        for caller in self.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    self.unregister(plugin)
                    raise PluginError(
                        f"plugin {registered!r}: {caller.name} is declared as a hook wrapper; "
                        "rbee calls each plugin on its own, so wrappers are not supported "
                        "(drop wrapper=True/hookwrapper=True, or disable the plugin with "
                        "RBEE_DISABLE_PLUGINS)", plugin=registered, hook=caller.name)
        return registered


def build_plugin_manager(disabled: Iterable[str] = (), extra_plugins: Iterable[object] = ()
                         ) -> RbeePluginManager:
    """A manager with the specs, the installed collector plugins and ``extra_plugins``.

    ``disabled`` and the comma-separated ``RBEE_DISABLE_PLUGINS`` name entry points to skip.
    ``RBEE_TRACE_PLUGINS=1`` logs each hook call with its duration (logger ``rbee.plugin.trace``).
    Raises PluginError for a plugin that declares a wrapper or implements an unknown hook.
    """
    manager = RbeePluginManager()
    blocked = set(disabled)
    blocked.update(n.strip() for n in os.environ.get("RBEE_DISABLE_PLUGINS", "").split(",") if n)
    for name in blocked:
        manager.set_blocked(name)
    load_entry_points(manager)
    for plugin in extra_plugins:
        manager.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
    refuse_unknown_hooks(manager)
    if os.environ.get("RBEE_TRACE_PLUGINS", "") not in ("", "0"):
        trace_calls(manager)
    return manager


def load_entry_points(manager: pluggy.PluginManager) -> None:
    """Load the ``rbee.collectors`` entry points one by one, so that one that fails to import
    (a missing dependency, a syntax error, a raise at import) is a ``PluginError`` of one line
    naming the plugin, its distribution and how to turn it off, not a traceback out of pluggy."""
    for dist in importlib.metadata.distributions():
        for entry in dist.entry_points:
            if (entry.group != ENTRY_POINT_GROUP or manager.get_plugin(entry.name) is not None
                    or manager.is_blocked(entry.name)):
                continue
            try:
                manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry.name)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {entry.name!r} (distribution {dist.metadata['Name']} "
                    f"{dist.version}) failed to load: {type(exc).__name__}: {exc}; turn it off "
                    f"with RBEE_DISABLE_PLUGINS={entry.name} or, in hive.yaml, "
                    f"collect: {{disabled_plugins: [{entry.name}]}}", plugin=entry.name) from None


def refuse_unknown_hooks(manager: pluggy.PluginManager) -> None:
    """PluginError for the first plugin implementing a hook rbee does not specify (what pluggy's
    ``check_pending`` refuses, told with the plugin and the hook as fields, not as text)."""
    for plugin in manager.get_plugins():
        for caller in manager.get_hookcallers(plugin) or ():
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not impl.optionalhook:
                    name = manager.get_name(plugin) or repr(plugin)
                    raise PluginError(f"plugin {name!r} implements {caller.name!r}, which is no "
                                      "rbee hook (see rbee.plugin.spec)", plugin=name,
                                      hook=caller.name)


def trace_calls(manager: pluggy.PluginManager) -> None:
    """Log every hook call, with the plugins it reached and how long it took."""
    started = threading.local()
    trace_log.setLevel(logging.INFO)

    def before(hook_name, impls, kwargs) -> None:
        stack = getattr(started, "stack", None)
        if stack is None:
            stack = started.stack = []
        stack.append(time.perf_counter())

    def after(outcome, hook_name, impls, kwargs) -> None:
        elapsed_ms = (time.perf_counter() - started.stack.pop()) * 1000
        worker = kwargs.get("worker")
        failed = " (raised)" if outcome.exception is not None else ""
        trace_log.info("%s[%s]%s %.3f ms%s", hook_name, ",".join(i.plugin_name for i in impls),
                       f" {worker.group}/{worker.instance}" if worker is not None else "",
                       elapsed_ms, failed)

    manager.add_hookcall_monitoring(before, after)


PerWorker = Callable[[object, object], object]


def _direct(impl: pluggy.HookImpl) -> PerWorker:
    """The implementation called as pluggy calls it: its own arguments, by name, in its order."""
    function, names = impl.function, tuple(impl.argnames)
    if names == ("worker", "telemetry"):
        return function
    return lambda worker, telemetry: function(
        *[worker if name == "worker" else telemetry for name in names])


class PluginHooks:
    """One hook caller per (hook, plugin), built once for the manager's plugins as they are now.

    ``callers(name)`` gives ``(plugin name, caller)`` in pluggy's own order (last registered
    first, ``tryfirst``/``trylast`` honoured); calling one runs that plugin's implementation alone.
    """

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self._callers: dict[str, list[tuple[str, pluggy.HookCaller]]] = {}
        self._direct: list[tuple[str, PerWorker]] | None = None
        self._through_pluggy: list[tuple[str, PerWorker]] | None = None

    def per_worker(self) -> list[tuple[str, PerWorker]]:
        """``(plugin name, call(worker, telemetry))`` for ``rbee_collect_worker``, in
        ``callers``' order: direct while the manager is not monitored (a plain pluggy manager
        counts as monitored), through pluggy while it is."""
        if getattr(self.manager, "monitors", 1):
            if self._through_pluggy is None:
                self._through_pluggy = [
                    (name, lambda worker, telemetry, call=call: call(worker=worker,
                                                                     telemetry=telemetry))
                    for name, call in self.callers("rbee_collect_worker")]
            return self._through_pluggy
        if self._direct is None:
            impls = reversed(self.manager.hook.rbee_collect_worker.get_hookimpls())
            self._direct = [(impl.plugin_name, _direct(impl)) for impl in impls]
        return self._direct

    def callers(self, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
        found = self._callers.get(hook_name)
        if found is None:
            impls = list(reversed(getattr(self.manager.hook, hook_name).get_hookimpls()))
            plugins = [impl.plugin for impl in impls]
            found = [
                (impl.plugin_name, self.manager.subset_hook_caller(
                    hook_name, [p for p in plugins if p is not impl.plugin]))
                for impl in impls
            ]
            self._callers[hook_name] = found
        return found
