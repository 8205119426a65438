"""Plugin figures in Prometheus' terms, for ``rbee.exposition`` (the hive's and the queen's
``/metrics``).

A figure a plugin declares (``rbee.plugin.MetricSpec``, carried to the queen in the heartbeat's
``HiveInfo.plugins``) gets a family of its own: ``rbee_plugin_<plugin>_<name>``, with the unit as
a suffix (Prometheus' convention; ``_per_second`` after it for a counter the hive turns into a
rate), the plugin's help text, and the labels of the built-in worker families. A counter is a
counter (``_total``); a gauge or a rate a gauge.

A figure nobody declares (an older plugin, or a hive older than declarations) is still exposed,
in one family for all of them, ``rbee_plugin_metric``, labelled with its ``key``: visible, never
silently lost, and without a family name made up from a key. When two hives declare one family
differently, the first hive's declaration holds and the other's figures go there too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from .contract import HiveInfo, HiveRecord, MetricKind, MetricSpec, WorkerTelemetry

UNDECLARED_NAME = "rbee_plugin_metric"
UNDECLARED_HELP = ("A plugin figure its plugin does not declare (rbee.plugin.MetricSpec), as the "
                   "plugin set it, labelled with its key")

_not_in_name = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True, slots=True)
class PluginFamily:
    name: str
    """Without ``_total``: the writers add it to a counter's samples."""
    help: str
    unit: str
    counter: bool


def plugin_family(plugin: str, spec: MetricSpec) -> PluginFamily:
    name = f"rbee_plugin_{_not_in_name.sub('_', plugin)}_{spec.name}"
    unit = spec.unit
    if spec.as_rate:
        unit = f"{unit}_per_second" if unit else ""
        suffix = unit or "per_second"
    else:
        suffix = unit
    if suffix and not name.endswith(f"_{suffix}"):
        name = f"{name}_{suffix}"
    text = " ".join(spec.help.split()) or f"{plugin}.{spec.name}, declared without help"
    return PluginFamily(name=name, help=f"{text} (plugin {plugin})", unit=unit,
                        counter=spec.kind == MetricKind.COUNTER and not spec.as_rate)


def declared_families(info: HiveInfo) -> dict[str, PluginFamily]:
    """The families a hive's plugins declare, by their ``metrics`` key."""
    return {f"{plugin.name}.{spec.name}": plugin_family(plugin.name, spec)
            for plugin in info.plugins for spec in plugin.metrics}


L = TypeVar("L")


def plugin_samples(hives: Iterable[HiveRecord], labels_of: Callable[[HiveRecord, WorkerTelemetry], L]
                   ) -> tuple[list[tuple[PluginFamily, list[tuple[L, float]]]],
                              list[tuple[L, str, float]]]:
    """Every plugin figure of the fleet: the declared ones by family (in the order first seen),
    and the undeclared ones as (labels, key, value). ``labels_of`` gives a worker's labels in
    the writer's own form (a tuple, or the text format's label string)."""
    families: dict[str, tuple[PluginFamily, list[tuple[L, float]]]] = {}
    undeclared: list[tuple[L, str, float]] = []
    for hive in hives:
        declared = declared_families(hive.info) if hive.info.plugins else {}
        for worker in hive.workers:
            if not worker.metrics:
                continue
            labels = labels_of(hive, worker)
            for key, value in worker.metrics.items():
                family = declared.get(key)
                if family is None:
                    undeclared.append((labels, key, value))
                    continue
                slot = families.get(family.name)
                if slot is None:
                    slot = families[family.name] = (family, [])
                slot[1].append((labels, value))
    return list(families.values()), undeclared
