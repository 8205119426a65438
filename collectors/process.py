"""Model name from the worker's command line, uptime from its start time in /proc.

Uptime uses the kernel's own clock: the view's start time comes from /proc/<pid>/stat, in clock
ticks (``os.sysconf("SC_CLK_TCK")``, not an assumed 100) since boot, and CLOCK_BOOTTIME is the
same clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import lru_cache

from rbee.plugin import hookimpl

MODEL_FLAGS = ("--model", "-m")


@lru_cache(maxsize=4096)
def model_from_argv(argv: Sequence[str]) -> str | None:
    """``--model X``, ``--model=X`` or ``-m X`` among the program's arguments.

    ``--model`` wins over ``-m``; ``vllm serve MODEL`` names it as its first argument. For a
    Python interpreter (``python -m vllm.entrypoints… --model
    X``) the interpreter's own options, its ``-m module`` included, are not the program's.
    """
    start = 1
    if (len(argv) > 2 and os.path.basename(argv[0]) == "vllm" and argv[1] == "serve"
            and not argv[2].startswith("-")):
        return argv[2]
    if os.path.basename(argv[0]).startswith("python") if argv else False:
        for index, arg in enumerate(argv[1:], start=1):
            if arg == "-m" or not arg.startswith("-"):
                start = index + (2 if arg == "-m" else 1)
                break
    short = None
    for index in range(start, len(argv)):
        arg = argv[index]
        if arg.startswith("--model="):
            return arg.removeprefix("--model=") or None
        if arg in MODEL_FLAGS and index + 1 < len(argv):
            if arg == "--model":
                return argv[index + 1]
            short = short or argv[index + 1]
    return short


@hookimpl
def rbee_collect_worker(worker, telemetry) -> None:
    telemetry.model = model_from_argv(worker.argv)
    started = worker.start_boottime_s
    if started is not None:
        telemetry.uptime_s = max(0, int(time.clock_gettime(time.CLOCK_BOOTTIME) - started))
