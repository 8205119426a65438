"""The whole public surface, pinned (as trio's test_exports does): what ``rbee``, the contract
package and the plugin API export, and the HTTP paths of the contract. A rename, a forgotten
re-export or a name that slips out unexported fails here, naming it; growing the surface is a
change to this file, made on purpose."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import rbee
import rbee.contract
import rbee.plugin
from rbee.contract import paths

RBEE = {
    "AdmissionError", "CgroupError", "CollectorError", "CollectorIssue", "ConfigError",
    "ContractError", "Degraded", "EngineState", "GpuDevice", "GpuFault", "GpuFaultKind",
    "GpuUtilSource", "Healthy", "HiveHeartbeat", "HiveInfo", "HiveRemovedEvent", "HiveStaleEvent",
    "HiveState", "HiveTelemetryEvent", "LaggedEvent", "LimitError", "ListenError",
    "NotFoundError", "OperationalStatus", "PluginError", "QueenEvent", "RbeeError",
    "SnapshotEvent", "SpawnError", "StreamEvent", "Unhealthy", "WorkerExistsError", "WorkerExit",
    "WorkerGpuUse", "WorkerState", "WorkerTelemetry", "decode_heartbeat", "decode_stream_event",
    "encode",
}

CONTRACT = {
    "ChannelAck", "ChannelDelta", "ChannelError", "ChannelResync", "ChannelSnapshot", "HiveFrame",
    "QueenFrame", "apply_delta", "decode_hive_frame", "decode_queen_frame", "encode_frame",
    "worker_key",
    "CollectorIssue", "Degraded", "EngineState", "FleetWorker", "GpuDevice", "GpuFault",
    "GpuFaultKind", "GpuIndex", "GpuUtilSource", "HealthStatus", "Healthy", "HistoryAnswer",
    "HiveHealth", "HiveHeartbeat", "HiveInfo", "HiveRecord", "HiveRemovedEvent", "HiveStaleEvent",
    "HiveState", "HiveTelemetryEvent", "ID_MAX_CHARS", "ID_PATTERN", "Identifier",
    "LONG_TEXT_CHARS", "LaggedEvent", "LongText", "MAX_ERRORS", "MAX_FIGURE", "MAX_GPUS",
    "MAX_METRICS", "MAX_PLUGINS", "MAX_TAIL_LINES", "MAX_WORKERS", "METRIC_KEY_CHARS", "METRIC_KEY_PATTERN",
    "MIB", "MetricKey", "MetricKind", "MetricSpec", "Metrics", "NonNegFloat", "NonNegInt", "OperationalStatus", "PLUGIN_NAME_PATTERN", "Pid", "PluginInfo",
    "PickAnswer", "PickedWorker",
    "QueenEvent", "QueenHealth", "QueenLink", "Reply", "SHORT_TEXT_CHARS", "STREAM_EVENT_NAME",
    "SeriesData", "ShortText", "EndpointUrl", "SignedFloat", "SnapshotEvent", "StreamEvent", "TAIL_BYTES",
    "TAIL_LINE_CHARS", "TailLine", "Unhealthy", "UtcTimestamp", "VramFigures", "WholeMib",
    "WorkerExit", "WorkerGpuUse", "WorkerName", "WorkerPage", "WorkerState", "WorkerTelemetry",
    "cut", "decode_heartbeat", "decode_json", "decode_stream_event", "describe_health", "encode",
    "DEFAULT_STREAM_EVENTS", "FleetSummary", "STREAM_EVENTS", "WorkerFields", "WorkerUpdateEvent",
    "gpu_health", "on_gpu", "paths", "reply_message", "utc_now", "worker_id",
}

PLUGIN = {
    "API_VERSION", "CollectorIssue", "CollectorSettings", "ENTRY_POINT_GROUP", "GpuDevice",
    "MetricKind", "MetricSpec", "PROJECT", "PluginInfo", "PluginSettings", "StatSample",
    "WorkerGpuUse", "WorkerTelemetry", "WorkerView", "hookimpl", "hookspec",
}

PATHS = {
    "HEALTH": "/health",
    "METRICS": "/metrics",
    "HEARTBEAT": "/v1/hive-heartbeat",
    "CHANNEL": "/v1/hive-channel",
    "STREAM": "/v1/heartbeats/stream",
    "HIVES": "/v1/hives",
    "HIVE": "/v1/hives/{hive_id}",
    "WORKERS": "/v1/workers",
    "HISTORY": "/v1/history",
    "PICK": "/v1/pick",
    "CAPABILITIES": "/capabilities",
    "HIVE_WORKER": "/v1/workers/{group}/{instance}",
}


@pytest.mark.parametrize("module, pinned", [(rbee, RBEE), (rbee.contract, CONTRACT),
                                            (rbee.plugin, PLUGIN)],
                         ids=["rbee", "rbee.contract", "rbee.plugin"])
def test_exports_are_exactly_the_pinned_names(module, pinned):
    exported = module.__all__
    assert len(exported) == len(set(exported)), "a name exported twice"
    assert set(exported) - pinned == set(), "exported but not pinned here"
    assert pinned - set(exported) == set(), "pinned here but no longer exported"
    for name in exported:
        assert getattr(module, name) is not None, name


def test_rbee_exports_the_contract_and_errors_themselves():
    """``rbee``'s names are the contract's and the errors' own objects, not copies."""
    from rbee import _errors

    for name in rbee.__all__:
        home = rbee.contract if name in CONTRACT else _errors
        assert getattr(rbee, name) is getattr(home, name), name


def test_every_public_name_of_the_contract_modules_is_exported():
    """Nothing defined in ``rbee/contract/*.py`` is public yet unexported."""
    for info in pkgutil.iter_modules(rbee.contract.__path__):
        module = importlib.import_module(f"rbee.contract.{info.name}")
        if module is paths:
            continue
        tree = ast.parse(inspect.getsource(module))
        defined = {node.name for node in tree.body
                   if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)}
        defined |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        public = {name for name in defined if not name.startswith("_") and name != "T"}
        assert public - CONTRACT == set(), f"rbee.contract.{info.name}"


def test_the_paths_are_named_once_and_pinned():
    named = {name: value for name, value in vars(paths).items() if name.isupper()}
    assert named == PATHS
