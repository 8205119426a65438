"""Where a worker's engine publishes its metrics, read from its command line.

Used when the worker's spec gives no ``metrics_url``. Each known launcher, with the default port
its own documentation gives and the flag that turns metrics on where they are off by default:

=========================================================  ========  ==========================
launcher                                                   default   metrics
=========================================================  ========  ==========================
``vllm serve …`` / ``python -m vllm.entrypoints…``         8000      always
``python -m sglang.launch_server …``                       30000     with ``--enable-metrics``
``text-generation-launcher …`` (``--port``/``-p``)         3000      always (``--prometheus-port``
                                                                     when given)
``llama-server …``                                         8080      with ``--metrics``
=========================================================  ========  ==========================

The host is ``--host`` when it names one address, else 127.0.0.1 (the hive runs beside the worker).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Launcher:
    name: str
    default_port: int
    port_flags: tuple[str, ...] = ("--port",)
    needs_flag: str | None = None


VLLM = Launcher("vllm", 8000)
SGLANG = Launcher("sglang", 30000, needs_flag="--enable-metrics")
TGI = Launcher("tgi", 3000, port_flags=("--prometheus-port", "--port", "-p"))
LLAMA_SERVER = Launcher("llamacpp", 8080, needs_flag="--metrics")

ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def launcher_of(argv: Sequence[str]) -> Launcher | None:
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program == "vllm" and len(argv) > 1 and argv[1] == "serve":
        return VLLM
    if program == "text-generation-launcher":
        return TGI
    if program == "llama-server":
        return LLAMA_SERVER
    if program.startswith("python"):
        module = next((argv[i + 1] for i in range(1, len(argv) - 1) if argv[i] == "-m"), "")
        if module.startswith("vllm.entrypoints"):
            return VLLM
        if module == "sglang.launch_server":
            return SGLANG
    return None


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """``--flag V`` or ``--flag=V``; the last one given wins, as argparse and clap have it."""
    found = None
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            found = argv[index + 1]
        elif arg.startswith(flag + "="):
            found = arg[len(flag) + 1:]
    return found


def metrics_url_from_argv(argv: Sequence[str]) -> str | None:
    """The engine's ``/metrics`` URL for a known launcher, None for anything else (or one whose
    metrics are off, or whose port flag is not a number)."""
    launcher = launcher_of(argv)
    if launcher is None or (launcher.needs_flag and launcher.needs_flag not in argv):
        return None
    port = launcher.default_port
    for flag in launcher.port_flags:
        value = flag_value(argv, flag)
        if value is not None:
            if not value.isdigit() or not 0 < int(value) < 65536:
                return None
            port = int(value)
            break
    host = flag_value(argv, "--host") or flag_value(argv, "--hostname") or ""
    if host in ANY_ADDRESS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"
