"""From a worker's spec to what the hive executes: placeholders filled in (``{python}``,
``{port}``), the binary found on PATH and checked, the GPUs it is given read from its
``CUDA_VISIBLE_DEVICES``. Pure functions of the spec and the host: nothing is started here."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._errors import SpawnError
from ..config import WorkerSpec


@dataclass(frozen=True, slots=True)
class Launch:
    """A spec made concrete for one start: every start of a ``{port}`` worker gets a new port."""

    argv: list[str]
    env: dict[str, str] | None
    metrics_url: str | None
    endpoint: str | None
    log_path: str | None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a worker whose spec says ``{port}``."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_of(spec: WorkerSpec, log_dir: str | None) -> Launch:
    """``{python}`` becomes this Python, ``{port}`` one free port (the same in argv, the
    metrics URL and the endpoint); the log file is ``<log_dir>/<group>-<instance>.log`` when a
    log dir is set."""
    wants_port = any("{port}" in arg for arg in (*spec.argv, spec.metrics_url or "",
                                                 spec.endpoint or ""))
    port = str(free_port()) if wants_port else ""
    return Launch(
        argv=[arg.replace("{python}", sys.executable).replace("{port}", port)
              for arg in spec.argv],
        env=dict(spec.env) if spec.env else None,
        metrics_url=_with_port(spec.metrics_url, port), endpoint=_with_port(spec.endpoint, port),
        log_path=f"{log_dir}/{spec.group}-{spec.instance}.log" if log_dir else None)


def adopted_urls(spec: WorkerSpec, argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The metrics URL and endpoint of a running worker of ``spec`` that a restarted hive
    re-adopted: a ``{port}`` in them is the port its command line (``argv``, as /proc reads it)
    has where the spec's argv says ``{port}``. None for one that cannot be told."""
    port = _port_in(spec.argv, argv)
    return _with_port(spec.metrics_url, port), _with_port(spec.endpoint, port)


def _with_port(template: str | None, port: str | None) -> str | None:
    if template is None or "{port}" not in template:
        return template
    return None if not port else template.replace("{port}", port)


def _port_in(templates: Sequence[str], argv: Sequence[str]) -> str | None:
    """The one port a command line has in every place its template says ``{port}``."""
    if len(templates) != len(argv):
        return None
    found = set()
    for template, arg in zip(templates, argv, strict=True):
        if "{port}" in template:
            pattern = re.escape(template.replace("{python}", sys.executable))
            match = re.fullmatch(pattern.replace(re.escape("{port}"), r"(\d{1,5})"), arg)
            if match is None:
                return None
            found.update(match.groups())
    return found.pop() if len(found) == 1 else None


def resolve_binary(program: str, env: Mapping[str, str] | None = None) -> str:
    """The absolute path of the worker binary, or a SpawnError saying what is wrong with it."""
    if "/" in program:
        path = program
        if not os.path.exists(path):
            raise SpawnError(f"worker binary not found: {program}")
    else:
        search = (env or {}).get("PATH") or os.environ.get("PATH", os.defpath)
        found = shutil.which(program, path=search)
        if found is None:
            if shutil.which(program, mode=os.F_OK, path=search):
                raise SpawnError(f"worker binary is not executable: {program}")
            raise SpawnError(f"worker binary not found on PATH: {program}")
        path = found
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise SpawnError(f"worker binary is not executable: {program}")
    return os.path.abspath(path)


def gpu_indices_from_env(env: Mapping[str, str] | None) -> tuple[int, ...]:
    """The GPUs a worker is given by its ``CUDA_VISIBLE_DEVICES`` (indices only; UUIDs or MIG
    names give none): the GPU collector's hint until the driver lists the worker's processes."""
    visible = (env or {}).get("CUDA_VISIBLE_DEVICES", "")
    parts = [part.strip() for part in visible.split(",") if part.strip()]
    return tuple(int(part) for part in parts) if all(p.isdigit() for p in parts) else ()
