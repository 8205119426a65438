"""An example rbee collector plugin: threads and open file descriptors of each worker.

It uses only the public plugin API (``rbee.plugin``, API ``1.x``): the ``WorkerView`` it is given
(``worker.pids()``: every process in the worker's cgroup) and the record it fills. Its numbers go
under ``telemetry.metrics`` as ``example.threads`` and ``example.open_fds``, and travel with the
heartbeat to the queen's ``/v1/workers`` and its stream.

To show that rbee isolates a failing plugin, it raises for a worker whose command line holds
``--example-crash``: that worker gets an ``errors`` entry from ``example``, nothing else changes.
"""

from __future__ import annotations

import os

from rbee.plugin import API_VERSION, hookimpl

if not API_VERSION.startswith("1."):
    raise ImportError(f"rbee-plugin-example needs rbee plugin API 1.x, not {API_VERSION}")


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


@hookimpl
def rbee_collect_worker(worker, telemetry) -> None:
    if "--example-crash" in worker.argv:
        raise RuntimeError("example plugin: crashing on purpose for this worker")
    threads = fds = 0
    for pid in worker.pids():
        try:
            threads += _threads(pid)
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    telemetry.metrics["example.threads"] = float(threads)
    telemetry.metrics["example.open_fds"] = float(fds)
