"""The library internals rbee builds on, named one by one, so that a release that moves one fails
here with a line naming it, not in a fleet's first connection.

``rbee/http/transport.py`` subclasses hypercorn's trio ``TCPServer`` and its ``ProtocolWrapper`` and
``H11Protocol``, overrides private methods of theirs, calls others and reads attributes their
constructors set. None of that is hypercorn's public API, so setup.py bounds hypercorn below its
next minor release (``<0.19``): a new release is let in by raising the bound once this test and
the suite pass against it (the latest lane, ``./dev test --latest``, tries it).

pynvml's private ``_nvmlGetFunctionPointer`` (``collectors/gpu/process_util.py``) needs no bound:
it is guarded, and falls back to the public wrapper (tests/test_gpu.py). A release without it
would only cost the one-call query, silently: the last test here says so first.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from importlib import metadata
from pathlib import Path

import pynvml

HYPERCORN = "hypercorn"
REPO = Path(__file__).parents[1]

MEMBERS: dict[str, tuple[str, ...]] = {
    # module: names, and Class.member, that rbee/http/transport.py imports, overrides or calls
    "hypercorn.config": ("Config", "Config.create_ssl_context", "Config.graceful_timeout",
                         "Sockets"),
    "hypercorn.events": ("Closed", "Event", "RawData", "Updated"),
    "hypercorn.protocol": ("ProtocolWrapper", "ProtocolWrapper.handle",
                           "ProtocolWrapper.initiate"),
    "hypercorn.protocol.h11": ("H2ProtocolAssumedError", "H11Protocol", "H11Protocol.handle",
                               "H11Protocol._check_protocol"),
    "hypercorn.trio.task_group": ("TaskGroup",),
    "hypercorn.trio.tcp_server": ("MAX_RECV", "TCPServer", "TCPServer.run",
                                  "TCPServer.protocol_send", "TCPServer._read_data",
                                  "TCPServer._close", "TCPServer._idle_timeout"),
    "hypercorn.trio.worker_context": ("WorkerContext", "TrioSingleTask.restart"),
    "hypercorn.typing": ("AppWrapper", "ConnectionState"),
    "hypercorn.utils": ("parse_socket_addr", "repr_socket_addr", "wrap_app"),
}

SIGNATURES: dict[str, tuple[str, ...]] = {
    # what rbee/http/transport.py passes positionally (or overrides), in this order
    "hypercorn.trio.tcp_server.TCPServer.__init__": ("self", "app", "config", "context", "state",
                                                     "stream"),
    "hypercorn.protocol.ProtocolWrapper.__init__": (
        "self", "app", "config", "context", "task_group", "state", "ssl", "client", "server",
        "send", "alpn_protocol"),
    "hypercorn.protocol.h11.H11Protocol.__init__": (
        "self", "app", "config", "context", "task_group", "connection_state", "ssl", "client",
        "server", "send"),
    "hypercorn.protocol.h11.H11Protocol._check_protocol": ("self", "event"),
    "hypercorn.trio.worker_context.WorkerContext.__init__": ("self", "max_requests"),
    "hypercorn.trio.worker_context.TrioSingleTask.restart": ("self", "task_group", "action"),
}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # instance attributes the class sets (``self.x =``) that rbee/http/transport.py reads or replaces
    "hypercorn.trio.tcp_server.TCPServer": ("app", "config", "context", "state", "stream",
                                            "idle_task", "protocol", "_task_group"),
    "hypercorn.protocol.ProtocolWrapper": ("app", "config", "context", "task_group", "state",
                                           "ssl", "client", "server", "send", "protocol"),
    "hypercorn.protocol.h11.H11Protocol": ("connection",),
    "hypercorn.trio.worker_context.WorkerContext": ("terminated",),
    "hypercorn.events.Updated": ("idle",),
}


def _resolve(dotted: str) -> object:
    """The object at ``dotted`` (a module, then attributes); AttributeError/ImportError if gone."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            found = getattr(found, name)
        return found
    raise ImportError(dotted)


def _sets_attribute(cls: type, name: str) -> bool:
    if dataclasses.is_dataclass(cls):
        return name in {field.name for field in dataclasses.fields(cls)}
    source = inspect.getsource(cls)
    return re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=", source) is not None


def moved_members(members: dict[str, tuple[str, ...]], signatures: dict[str, tuple[str, ...]],
                  attributes: dict[str, tuple[str, ...]]) -> list[str]:
    """One line for each named member that is gone or changed shape."""
    version = metadata.version(HYPERCORN)
    moved = []
    for module, names in members.items():
        for name in names:
            try:
                _resolve(f"{module}.{name}")
            except (ImportError, AttributeError):
                moved.append(f"hypercorn {version}: {module}.{name} is gone "
                             "(rbee/http/transport.py uses it)")
    for function, expected in signatures.items():
        try:
            found = tuple(inspect.signature(_resolve(function)).parameters)
        except (ImportError, AttributeError):
            found = None
        if found != expected:
            moved.append(f"hypercorn {version}: {function} takes {found}, not {expected} "
                         "(rbee/http/transport.py calls or overrides it so)")
    for class_name, names in attributes.items():
        try:
            cls = _resolve(class_name)
        except (ImportError, AttributeError):
            moved.append(f"hypercorn {version}: {class_name} is gone (rbee/http/transport.py "
                         "reads its attributes)")
            continue
        moved.extend(f"hypercorn {version}: {class_name} no longer sets .{name} "
                     "(rbee/http/transport.py reads it)"
                     for name in names if not _sets_attribute(cls, name))
    return moved


def test_every_hypercorn_internal_rbee_touches_is_where_it_was():
    moved = moved_members(MEMBERS, SIGNATURES, ATTRIBUTES)
    assert not moved, "\n" + "\n".join(moved)


def test_a_moved_member_is_one_line_naming_it():
    """The canary can fail: a release without one of them (played by names that are not
    there) gives exactly one line each, naming the member."""
    version = metadata.version(HYPERCORN)
    moved = moved_members(
        {**MEMBERS, "hypercorn.trio.tcp_server": ("TCPServer", "TCPServer._read_more")},
        {**SIGNATURES, "hypercorn.protocol.h11.H11Protocol._check_protocol": ("self", "request")},
        {**ATTRIBUTES, "hypercorn.protocol.h11.H11Protocol": ("connection", "conn")})
    assert moved == [
        f"hypercorn {version}: hypercorn.trio.tcp_server.TCPServer._read_more is gone "
        "(rbee/http/transport.py uses it)",
        f"hypercorn {version}: hypercorn.protocol.h11.H11Protocol._check_protocol takes "
        "('self', 'event'), not ('self', 'request') (rbee/http/transport.py calls or overrides it so)",
        f"hypercorn {version}: hypercorn.protocol.h11.H11Protocol no longer sets .conn "
        "(rbee/http/transport.py reads it)",
    ]


def test_setup_bounds_hypercorn_below_the_next_minor_of_the_locked_one():
    """The range setup.py declares stops below the next minor of the hypercorn the lock pins
    (the one the suite runs on): raising the bound and refreshing the lock go together."""
    requirement = next(r for r in metadata.requires("rbee-telemetry") or []
                       if re.match(r"hypercorn\b", r, re.IGNORECASE))
    lock = REPO / "locks" / f"run-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
    major, minor = re.search(r"^hypercorn==(\d+)\.(\d+)", lock.read_text(), re.MULTILINE).groups()
    assert f"<{major}.{int(minor) + 1}" in requirement.replace(" ", ""), requirement


def test_pynvml_private_lookup_is_where_it_was():
    """The one-call per-process GPU query's pynvml internals (importing pynvml loads no driver:
    this runs on a machine without a GPU)."""
    version = metadata.version("nvidia-ml-py")
    moved = [f"nvidia-ml-py {version}: pynvml.{name} is gone (collectors/gpu/process_util.py "
             "falls back to the slower public wrapper)"
             for name in ("_nvmlGetFunctionPointer", "c_nvmlProcessUtilizationSample_t")
             if not hasattr(pynvml, name)]
    if not moved:
        fields = {name for name, *_ in pynvml.c_nvmlProcessUtilizationSample_t._fields_}
        moved += [f"nvidia-ml-py {version}: c_nvmlProcessUtilizationSample_t has no {name}"
                  for name in ("pid", "timeStamp", "smUtil", "memUtil") if name not in fields]
    assert not moved, "\n" + "\n".join(moved)
