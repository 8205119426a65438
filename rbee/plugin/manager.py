"""Builds the plugin manager: hook specs, then every plugin under the ``rbee.collectors`` entry
points (built-ins included), minus those named in ``RBEE_DISABLE_PLUGINS`` or the config.

``PluginHooks`` is how the hive calls them: one pluggy hook caller per plugin and hook, so every
call goes through pluggy (its tracing and monitoring see it) while each plugin stays isolated.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

import pluggy

from .._errors import PluginError
from . import ENTRY_POINT_GROUP, PROJECT, spec

trace_log = logging.getLogger("rbee.plugin.trace")


class RbeePluginManager(pluggy.PluginManager):
    """A pluggy manager that refuses hook wrappers at registration (see ``rbee.plugin.spec``)."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(spec)

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
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        manager.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        name = manager.get_name(exc.plugin) or repr(exc.plugin)
        hook = str(exc).split("'")[1] if str(exc).count("'") >= 2 else ""
        raise PluginError(f"plugin {name!r} implements {hook!r}, which is no rbee hook (see "
                          "rbee.plugin.spec)", plugin=name, hook=hook) from exc
    if os.environ.get("RBEE_TRACE_PLUGINS", "") not in ("", "0"):
        trace_calls(manager)
    return manager


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


class PluginHooks:
    """One hook caller per (hook, plugin), built once for the manager's plugins as they are now.

    ``callers(name)`` gives ``(plugin name, caller)`` in pluggy's own order (last registered
    first, ``tryfirst``/``trylast`` honoured); calling one runs that plugin's implementation alone.
    """

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self._callers: dict[str, list[tuple[str, pluggy.HookCaller]]] = {}

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
