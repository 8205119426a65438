"""What Python's cyclic collector costs a queen of N eight-GPU hives, on heartbeats decoded from
their JSON as the transport decodes them:

    python bench/gcpause.py [N] [--no-sharing]

N hives (default 10,000) are stored, the collector is run and what exists frozen (as
``rbee-queen`` does at start, ``rbee._daemon.settle_gc``); then every hive's next heartbeat is stored (a
second of the fleet, all of it young) and a young collection (``gc.collect(0)``) and a full one
are timed in CPU time. ``--no-sharing`` stores the heartbeats as decoded, without the
registry's shared strings and empty lists (``rbee/queen/sharing.py``), for comparison.
"""

from __future__ import annotations

import gc
import sys
import time

from rbee.config import RegistrySettings
from rbee.contract import decode_heartbeat
from rbee.queen import sharing
from rbee.queen.registry import HiveRegistry
from tests.fleetload import eight_gpu_heartbeat


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    hives = int(args[0]) if args else 10_000
    if "--no-sharing" in sys.argv:
        sharing.SharedText.share = lambda self, heartbeat: None
    bodies = [eight_gpu_heartbeat(f"hive-{n:05d}", n) for n in range(hives)]
    registry = HiveRegistry(RegistrySettings(max_hives=2 * hives, new_hives_burst=2 * hives))
    for body in bodies:
        registry.update_hive(decode_heartbeat(body))
    gc.collect()
    gc.freeze()
    gc.disable()
    tracked = len(gc.get_objects())
    for body in bodies:
        registry.update_hive(decode_heartbeat(body))
    young = (len(gc.get_objects()) - tracked) / hives
    began = time.thread_time()
    gc.collect(0)
    took_young = time.thread_time() - began
    gc.unfreeze()
    began = time.thread_time()
    gc.collect()
    took_full = time.thread_time() - began
    print(f"{hives:,} hives{' (no sharing)' if '--no-sharing' in sys.argv else ''}: "
          f"{young:.0f} tracked objects per heartbeat stored; a young collection after a second "
          f"of heartbeats {took_young * 1e3:.1f} ms, a full collection {took_full * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
