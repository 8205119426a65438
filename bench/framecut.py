"""What a channel frame costs the queen, part by part: one fleet of eight-GPU channel hives
(``tests/fleetload.py --channel``, on CPU 1) against ``rbee-queen`` (on CPU 0) with its frame path
cut short at each stage in turn, the stages taking turns round after round so that the machine's
drift lands on all of them alike:

- ``ack``: every frame answered with an ack, unread: the transport (trio's wait and wake-up, the
  socket's read and write, the WebSocket frame code, the channel's loop and its metrics);
- ``decode``: the frame decoded (msgpack into the contract's structs, then freed), then acked;
- ``take``: decoded and applied to the hive's last heartbeat (``HiveLink.take`` without the
  store: ``Ingest.accept`` returns at once, so nothing is shared, stored or published);
- ``whole``: the queen as it ships (the registry, the shared strings, the stream's event, the
  idle judgement, the fleet summary and history over what is stored).

    python bench/framecut.py [HIVES] [ROUNDS]      # 3200 hives, 2 rounds by default

Prints the queen's CPU (utime + stime, from /proc) per frame answered over a 15 s window, each
stage each round, then the median per stage and what each stage adds to the one before.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hostilekit import raise_descriptor_limit  # noqa: E402

CUTS = {
    "ack": """
from rbee.queen import channel
from rbee.contract import ChannelAck
ACK = ChannelAck(0)
async def take(self, data):
    return ACK
channel.HiveLink.take = take
""",
    "decode": """
from rbee.queen import channel
from rbee.contract import ChannelAck, decode_hive_frame
async def take(self, data):
    return ChannelAck(decode_hive_frame(data).seq)
channel.HiveLink.take = take
""",
    "take": """
from rbee.queen.ingest import Ingest
async def accept(self, heartbeat, size, acting_as, delta=None):
    return ""
Ingest.accept = accept
""",
    "whole": "",
}
WARMUP_S, WINDOW_S = 8, 15
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def measure(cut: str, hives: int, directory: Path) -> tuple[float, dict]:
    """The queen's CPU seconds per frame answered over one window, and the load's report."""
    config = directory / "queen.yaml"
    config.write_text(f"port: 0\nhttp: {{max_connections: {hives + 512}}}\n"
                      f"registry: {{max_hives: {hives * 2}, new_hives_per_s: 1000000, "
                      f"new_hives_burst: {hives * 2}}}\n")
    code = (f"{CUTS[cut]}\nimport sys\nfrom rbee.queen.main import main\n"
            f"sys.argv = ['rbee-queen', '--config', {str(config)!r}, '--log-level', 'WARNING']\n"
            f"sys.exit(main())\n")
    queen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    load = None
    try:
        port = queen.stdout.readline().split()[-1].rsplit(":", 1)[1]
        load = subprocess.Popen(
            [sys.executable, "-m", "tests.fleetload", port, "--channel", "--warmup-s",
             str(WARMUP_S), "--window-s", str(WINDOW_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            preexec_fn=lambda: os.sched_setaffinity(0, {1}))
        load.stdin.write(f"{hives}\n")
        load.stdin.flush()
        while (line := load.stdout.readline()) and line.strip() != "start":
            pass
        before = cpu_seconds(queen.pid)
        while (line := load.stdout.readline()) and line.strip() != "end":
            pass
        spent = cpu_seconds(queen.pid) - before
        while (line := load.stdout.readline()) and not line.startswith("{"):
            pass
        report = json.loads(line)
        return spent / max(report["ok"], 1), report
    finally:
        if load is not None:
            load.stdin.close()
            load.terminate()
            load.wait(30)
        queen.terminate()
        queen.wait(30)


def main() -> None:
    hives = int(sys.argv[1]) if len(sys.argv) > 1 else 3200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    raise_descriptor_limit(hives + 1024)
    figures: dict[str, list[float]] = {cut: [] for cut in CUTS}
    with tempfile.TemporaryDirectory(prefix="rbee-framecut-") as directory:
        for round_ in range(rounds):
            for cut in CUTS:
                per_frame, report = measure(cut, hives, Path(directory))
                figures[cut].append(per_frame)
                print(f"round {round_ + 1} {cut:>6}: {per_frame * 1e6:6.1f} µs a frame, p99 "
                      f"{report['p99_ms']:.1f} ms, {report['ok']} of {report['expected']} "
                      f"answered", flush=True)
                time.sleep(1)
    last = 0.0
    print(f"{hives} channel hives, median of {rounds} round(s):")
    for cut, values in figures.items():
        median = statistics.median(values) * 1e6
        print(f"  {cut:>6}: {median:6.1f} µs a frame ({median - last:+6.1f})")
        last = median


if __name__ == "__main__":
    main()
