"""``./dev gpu-check``: the GPU path checked end to end on a machine with a real NVIDIA GPU.

Starts a real queen and a real hive (their own processes), the hive running two real CUDA workers
on GPU 0 (``bench/cuda_worker.py``): ``busy-0`` running ~90 % of the time while holding memory, and
``idle-0`` holding memory and doing nothing. Then it checks what a scheduler relies on:

- the idle worker at <= 5 % GPU and listed by ``rbee workers --idle``; the busy one >= 50 %;
- VRAM per worker within 1 % of nvidia-smi's (else of NVML's own process list);
- free VRAM within 1 % of the driver's;
- the NVML refresh (the tick's critical path) and the per-process sample, per GPU;
- no GPU process of either worker left once the hive has stopped.

It prints a table and exits 1 if a check fails; without a GPU it says "skipped: no GPU" and exits
0. PyTorch is used for the workers when importable, else the CUDA driver library via ctypes
(``--cuda ctypes`` forces that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
HOLD_MIB = {"busy-0": 10240, "idle-0": 3584}


class Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool]] = []

    def __call__(self, name: str, measured: str, target: str, ok: bool) -> bool:
        self.rows.append((name, measured, target, ok))
        return ok

    def info(self, name: str, measured: str, target: str) -> None:
        """A figure to report, not a pass/fail check."""
        self.rows.append((name, measured, target, None))

    def table(self) -> str:
        widths = [max(len(r[i]) for r in [("check", "measured", "target", True), *self.rows])
                  for i in range(3)]
        lines = [f"{'check':<{widths[0]}}  {'measured':<{widths[1]}}  {'target':<{widths[2]}}  result"]
        lines += [f"{n:<{widths[0]}}  {m:<{widths[1]}}  {t:<{widths[2]}}  "
                  f"{'info' if ok is None else 'PASS' if ok else 'FAIL'}" for n, m, t, ok in self.rows]
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(ok is False for *_, ok in self.rows)


def no_gpu_reason() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return None if count else "NVML sees no GPU"
    except Exception as exc:  # the library or the driver missing
        return f"NVML: {exc}"


def start(argv: list[str], workdir: Path, name: str) -> tuple[subprocess.Popen, str]:
    """A daemon from this environment, run from ``workdir`` (never the checkout: the installed
    package, with its built extension and entry points, is the one under test)."""
    stderr = (workdir / f"{name}.stderr").open("w")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=workdir)
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"gpu-check: {name} did not start: {(workdir / f'{name}.stderr').read_text()}")
    return process, line.split()[-1]


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fleet(queen: str, **params) -> dict[str, dict]:
    found = httpx.get(f"{queen}/v1/workers", params=params, timeout=5).json()
    return {w["worker"]["instance"]: w for w in found}


def smi_vram() -> tuple[dict[int, float], str]:
    """PID → MiB as nvidia-smi prints it, else as NVML lists it."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
        return {int(p): float(m) for p, m in (line.split(",") for line in out.splitlines()
                                              if line.strip())}, "nvidia-smi"
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    found = {p.pid: p.usedGpuMemory / 2**20 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    pynvml.nvmlShutdown()
    return found, "NVML"


def driver_free_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    free = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free / 2**20
    pynvml.nvmlShutdown()
    return free


def gpu_pids() -> set[int]:
    import pynvml

    pynvml.nvmlInit()
    pids = set()
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pids |= {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    pynvml.nvmlShutdown()
    return pids


def refresh_costs(rounds: int = 200) -> tuple[int, dict[str, float]]:
    """GPUs, and the median ms per GPU of the refresh (snapshot) and of the per-process sample,
    in wall time and in this thread's CPU time (the share of a core is CPU; NVML may wait on the
    driver without spinning)."""
    from rbee.collectors.gpu.nvml import NvmlSource

    source = NvmlSource(event_wait_s=0.0)
    gpus = len(source.handles)
    costs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, call in (("snapshot", source.snapshot), ("sample", source.sample)):
            wall, cpu = time.perf_counter(), time.thread_time()
            call()
            costs.setdefault(f"{name} wall", []).append((time.perf_counter() - wall) * 1e3 / gpus)
            costs.setdefault(f"{name} cpu", []).append((time.thread_time() - cpu) * 1e3 / gpus)
    source.close()
    return gpus, {name: statistics.median(values) for name, values in costs.items()}


def _util(found: dict) -> float:
    """A worker's GPU %, or -1 where the queen has no figure (which fails every check)."""
    util = found["worker"]["gpu_util_pct"]
    return -1.0 if util is None else util


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", choices=("auto", "torch", "ctypes"), default="auto")
    parser.add_argument("--rounds", type=int, default=6, help="queen readings, 1 s apart")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = parser.parse_args()
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: skipped: no GPU ({reason})")
        return 0
    check = Check()
    workdir = Path(tempfile.mkdtemp(prefix="rbee-gpu-check-"))
    root = f"rbee-gpu-check-{os.getpid()}"
    (workdir / "queen.yaml").write_text(yaml.safe_dump({"port": 0}))
    workers = [{"group": "llm", "instance": name, "restart": "never",
                "env": {"CUDA_VISIBLE_DEVICES": "0", "PATH": os.environ.get("PATH", "/usr/bin")},
                "argv": [sys.executable, str(HERE / "cuda_worker.py"), "--mode", name.split("-")[0],
                         "--hold-mib", str(mib), "--cuda", args.cuda, "--model", f"check-{name}"]}
               for name, mib in HOLD_MIB.items()]
    queen, url = start([sys.executable, "-m", "rbee.queen.main", "--config", "queen.yaml"],
                       workdir, "queen")
    hive = None
    pids: dict[str, int] = {}
    try:
        (workdir / "hive.yaml").write_text(yaml.safe_dump({
            "id": "gpu-check", "port": 0, "queen_url": url, "stop_workers_on_exit": True,
            "cgroup": {"root": root}, "collect": {"gpu": "nvml"}, "workers": workers,
            "log_dir": str(workdir)}))
        hive, _ = start([sys.executable, "-m", "rbee.hive.main", "--config", "hive.yaml"],
                        workdir, "hive")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = fleet(url)
            if all((seen.get(n, {}).get("worker", {}).get("vram_mb") or 0) >= mib * 0.95
                   for n, mib in HOLD_MIB.items()):
                break
            time.sleep(1)
        else:
            logs = {p.name: p.read_text()[-800:] for p in workdir.glob("llm-*.log")}
            raise SystemExit(f"gpu-check: workers did not take their memory in 120 s: {logs}")
        time.sleep(3)  # a few ticks of steady state
        gpus, ms = refresh_costs()  # with GPU 0 in use, so the per-process query runs
        check("GPUs seen by NVML", str(gpus), ">= 1", gpus >= 1)
        check("NVML refresh, per GPU (critical path)",
              f"{ms['snapshot wall']:.3f} ms ({ms['snapshot cpu']:.3f} CPU)", "<= 0.3 ms",
              ms["snapshot wall"] <= 0.3)
        check.info("per-process sample, per GPU in use",
                   f"{ms['sample wall']:.3f} ms ({ms['sample cpu']:.3f} CPU)", "own thread, 1/tick")
        core_pct = 8 * (ms["snapshot cpu"] + ms["sample cpu"]) / 1000 * 100
        check.info("8 GPUs in use at 1 Hz, CPU of one core", f"{core_pct:.2f} %", "< 2 %")
        readings = []
        for _ in range(args.rounds):
            seen = fleet(url)
            readings.append(seen)
            time.sleep(1)
        pids = {n: w["worker"]["pid"] for n, w in readings[-1].items()}
        idle_util = max(_util(r["idle-0"]) for r in readings)
        busy_util = statistics.median(_util(r["busy-0"]) for r in readings)
        sources = {r[n]["worker"].get("gpu_util_source") for r in readings for n in HOLD_MIB}
        check("idle-0 GPU %, max of readings", f"{idle_util:.1f} %", "<= 5 %", idle_util <= 5)
        check("busy-0 GPU %, median of readings", f"{busy_util:.1f} %", ">= 50 %", busy_util >= 50)
        check("utilisation source", ",".join(sorted(map(str, sources))), "process",
              sources == {"process"})
        listed = subprocess.run([sys.executable, "-m", "rbee.cli", "workers", "--queen", url,
                                 "--idle", "--json"], capture_output=True, text=True, cwd=workdir,
                                timeout=30)
        idle_listed = sorted(w["worker"]["instance"] for w in json.loads(listed.stdout or "[]"))
        check("rbee workers --idle", ",".join(idle_listed) or "(none)", "idle-0",
              idle_listed == ["idle-0"])
        reference, tool = smi_vram()
        final = fleet(url)
        for name in HOLD_MIB:
            ours = final[name]["worker"]["vram_mb"]
            theirs = reference.get(pids[name], 0.0)
            off = abs(ours - theirs) / theirs * 100 if theirs else 100.0
            check(f"{name} VRAM vs {tool}", f"{ours:.0f} / {theirs:.0f} MiB", "within 1 %", off <= 1)
        hive_free = final["idle-0"]["vram"]["free_mb"]
        driver_free = driver_free_mib()
        off = abs(hive_free - driver_free) / driver_free * 100
        check("free VRAM vs driver", f"{hive_free:.0f} / {driver_free:.0f} MiB", "within 1 %",
              off <= 1)
        gpu = httpx.get(f"{url}/v1/hives/gpu-check", timeout=5).json()["capabilities"][0]
        check("GPU 0 health", gpu.get("health", {}).get("status", "?"), "reported",
              "health" not in gpu or gpu["health"]["status"] in ("healthy", "degraded", "unhealthy"))
    except BaseException:
        for log in ("hive.stderr", "queen.stderr", *(p.name for p in workdir.glob("llm-*.log"))):
            text = (workdir / log).read_text()[-1500:] if (workdir / log).exists() else ""
            print(f"--- {log}\n{text}", file=sys.stderr)
        raise
    finally:
        if hive is not None:
            stop(hive)
        stop(queen)
    deadline = time.monotonic() + 10
    while (left := gpu_pids() & set(pids.values())) and time.monotonic() < deadline:
        time.sleep(0.5)
    check("GPU processes left after the hive stopped", str(sorted(left)) if left else "none",
          "none", not left)
    print(check.table())
    if args.json:
        Path(args.json).write_text(json.dumps(
            [dict(zip(("check", "measured", "target", "pass"), r, strict=True)) for r in check.rows],
            indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
