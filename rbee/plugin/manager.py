"""Builds the plugin manager: hook specs, then every plugin under the ``rbee.collectors`` entry
points (built-ins included), minus those named in ``RBEE_DISABLE_PLUGINS`` or the config."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pluggy

from . import ENTRY_POINT_GROUP, PROJECT, spec


def build_plugin_manager(disabled: Iterable[str] = (), extra_plugins: Iterable[object] = ()
                         ) -> pluggy.PluginManager:
    """A manager with the specs, the installed collector plugins and ``extra_plugins``.

    ``disabled`` and the comma-separated ``RBEE_DISABLE_PLUGINS`` name entry points to skip.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(spec)
    blocked = set(disabled)
    blocked.update(n.strip() for n in os.environ.get("RBEE_DISABLE_PLUGINS", "").split(",") if n)
    for name in blocked:
        manager.set_blocked(name)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        manager.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
    manager.check_pending()
    return manager
