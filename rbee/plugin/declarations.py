"""What the hive knows of each plugin beyond its hooks: its distribution and version, the figures
it declares (``rbee_declare_metrics``) and its own config section (``rbee_plugin_settings``).

Both are read once, when the plugins are loaded, by the hive at start-up and by
``rbee-hive --check-config`` alike, so a bad declaration or a bad section stops both with the
same one-line error naming the plugin (and the key). The declarations travel in the heartbeat
(``HiveInfo.plugins``), which is how the queen's ``/metrics`` knows their help texts and units.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import msgspec
import pluggy

from .._errors import ConfigError, PluginError
from ..config import Settings, parse_config
from ..contract import (
    MAX_METRICS,
    MAX_PLUGINS,
    METRIC_KEY_CHARS,
    METRIC_KEY_PATTERN,
    MetricKind,
    MetricSpec,
    PluginInfo,
    cut,
)
from .manager import PluginHooks

OWN_DISTRIBUTION = "rbee-telemetry"
"""The built-in collectors' distribution: not described in the heartbeat (they declare nothing)."""

_metric_key = re.compile(METRIC_KEY_PATTERN)


class PluginSettings(Settings):
    """Base of a plugin's config struct: keyword-only, unknown keys refused (a typo in hive.yaml
    is an error naming the key, never a silent default)."""


def _one_result(hooks: PluginHooks, hook_name: str) -> dict[str, Any]:
    """Each plugin's answer to a hook that takes no argument, by plugin name; a plugin that
    raises is a PluginError naming it and the hook."""
    answers: dict[str, Any] = {}
    for name, call in hooks.callers(hook_name):
        try:
            results = call()
        except Exception as exc:
            raise PluginError(f"plugin {name!r}: {hook_name} raised {type(exc).__name__}: {exc}",
                              plugin=name, hook=hook_name) from None
        answers[name] = results[0] if results else None
    return answers


def declared_metrics(plugin: str, declared: object) -> list[MetricSpec]:
    """A plugin's declarations, validated: each a ``MetricSpec`` (or a mapping of its fields),
    its key ``<plugin>.<name>`` one the contract carries, no name twice, ``as_rate`` only on a
    counter."""
    specs: list[MetricSpec] = []
    seen: set[str] = set()
    for item in list(declared or ()):
        try:
            spec = msgspec.convert(msgspec.to_builtins(item), MetricSpec)
        except (msgspec.ValidationError, TypeError) as exc:
            raise PluginError(f"plugin {plugin!r} declares a bad metric {item!r}: {exc}",
                              plugin=plugin, hook="rbee_declare_metrics") from None
        key = f"{plugin}.{spec.name}"
        problem = ("is declared twice" if spec.name in seen
                   else f"makes the key {key!r}, longer than {METRIC_KEY_CHARS} characters"
                   if len(key) > METRIC_KEY_CHARS
                   else f"makes the key {key!r}, outside {METRIC_KEY_PATTERN}"
                   if not _metric_key.match(key)
                   else "is a gauge: only a counter can be as_rate"
                   if spec.as_rate and spec.kind != MetricKind.COUNTER else "")
        if problem:
            raise PluginError(f"plugin {plugin!r}: metric {spec.name!r} {problem}",
                              plugin=plugin, hook="rbee_declare_metrics")
        seen.add(spec.name)
        specs.append(spec)
    if len(specs) > MAX_METRICS:
        raise PluginError(f"plugin {plugin!r} declares {len(specs)} metrics, more than a record "
                          f"carries ({MAX_METRICS})", plugin=plugin, hook="rbee_declare_metrics")
    return specs


def describe_plugins(manager: pluggy.PluginManager) -> list[PluginInfo]:
    """Every plugin but the built-ins: name, distribution, version and declared metrics (a
    plugin registered without a distribution, as in tests, only when it declares some)."""
    hooks = PluginHooks(manager)
    declared = _one_result(hooks, "rbee_declare_metrics")
    settings = _one_result(hooks, "rbee_plugin_settings")
    dists = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    infos = []
    for plugin in manager.get_plugins():
        name = manager.get_name(plugin)
        if name is None:
            continue
        dist = dists.get(id(plugin))
        metrics = declared_metrics(name, declared.get(name))
        if dist is None and not metrics and name not in settings:
            continue
        if dist is not None and dist.project_name == OWN_DISTRIBUTION:
            continue
        infos.append(PluginInfo(name=cut(name, 256), metrics=metrics,
                                distribution="" if dist is None else cut(dist.project_name, 256),
                                version="" if dist is None else cut(str(dist.version), 256)))
    return sorted(infos, key=lambda info: info.name)[:MAX_PLUGINS]


def rate_keys(infos: list[PluginInfo]) -> frozenset[str]:
    """The ``metrics`` keys the hive turns from counters into rates."""
    return frozenset(f"{info.name}.{spec.name}" for info in infos for spec in info.metrics
                     if spec.as_rate)


def configure_plugins(manager: pluggy.PluginManager,
                      sections: Mapping[str, Mapping[str, Any] | None],
                      source: str = "") -> dict[str, msgspec.Struct | None]:
    """Each plugin's validated ``plugins.<name>`` section (None for a plugin that takes none).

    A section for a plugin that is not installed, or for one that takes no settings, is a
    ConfigError naming it; so is a bad value, naming ``plugins.<name>.<key>``. A section of a
    disabled plugin is not checked: turning a plugin off must not need its config removed."""
    settings = _one_result(PluginHooks(manager), "rbee_plugin_settings")
    loaded = sorted(name for plugin in manager.get_plugins()
                    if (name := manager.get_name(plugin)) is not None)
    for name in sections:
        if manager.is_blocked(name):
            continue
        if name not in loaded:
            close = difflib.get_close_matches(name, loaded, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"no plugin {name!r} is installed{hint}; installed: "
                              f"{', '.join(loaded) or 'none'}", source=source,
                              key=f"plugins.{name}")
        if name not in settings:
            raise ConfigError(f"plugin {name!r} takes no settings (it implements no "
                              "rbee_plugin_settings)", source=source, key=f"plugins.{name}")
    configs: dict[str, msgspec.Struct | None] = {}
    for name in loaded:
        struct = settings.get(name)
        if struct is None:
            configs[name] = None
            continue
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)):
            raise PluginError(f"plugin {name!r}: rbee_plugin_settings returned {struct!r}, not a "
                              "msgspec.Struct class", plugin=name, hook="rbee_plugin_settings")
        where = ": ".join(part for part in (source, f"plugins.{name}") if part)
        configs[name] = parse_config(sections.get(name) or {}, struct, where)
    return configs
