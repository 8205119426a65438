"""GPU collection. This machine has no GPU: nvidia-smi is a fake script on PATH printing the real
tool's CSV, and NVML is a stub module with pynvml's interface (tests/fakes.py). Both are mocks of
what cannot exist here, and nothing else in these tests is."""

from __future__ import annotations

import sys
import time

import pytest
from rbee.collectors.gpu import GpuCollector

from rbee import CollectorError
from rbee.config import CollectorSettings
from rbee.hive.collection import TelemetryCollector
from rbee.hive.gpu import NvidiaSmiSource, NvmlSource, open_gpu_source, run_with_timeout
from rbee.plugin.manager import build_plugin_manager

from .conftest import sleeper
from .fakes import StubNvml, processes_left, write_fake_nvidia_smi


def test_nvml_snapshot_reads_real_totals_and_processes():
    nvml = StubNvml()
    nvml.place(gpu=1, pid=4242, mib=30000, sm_util=64)
    source = NvmlSource(nvml)
    snapshot = source.snapshot()
    assert [(d.index, d.vram_total_mb, d.vram_free_mb) for d in snapshot.devices] == [
        (0, 81559.0, 80535.0), (1, 97871.0, 77391.0)]
    assert snapshot.devices[1].power_w is None  # unsupported sensor, not an error
    assert snapshot.devices[1].temperature_c == 55
    [use] = snapshot.processes[4242]
    assert (use.gpu_index, use.vram_mb, use.util_pct) == (1, 30000.0, 64.0)
    source.close()
    assert (nvml.initialised, nvml.shutdowns) == (1, 1)


def test_nvml_worker_attribution_counts_child_processes(cgroup_monitor):
    """A worker's GPU use is that of every process in its cgroup, its children too."""
    parent = [sys.executable, "-c",
              "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"]
    monitor = cgroup_monitor
    pid = monitor.spawn("llm", "gpu", parent)
    deadline = time.monotonic() + 5
    while len(monitor.get("llm", "gpu").list_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = monitor.get("llm", "gpu").list_pids()
    child = next(p for p in pids if p != pid)
    nvml = StubNvml()
    nvml.place(gpu=0, pid=child, mib=12000, sm_util=40)
    nvml.place(gpu=1, pid=pid, mib=2000, sm_util=10)
    manager = build_plugin_manager(disabled=["gpu"], extra_plugins=[GpuCollector(NvmlSource(nvml))])
    collector = TelemetryCollector(monitor, manager, CollectorSettings())
    collector.refresh_devices()
    record = collector.collect_instance("llm", "gpu")
    assert record.gpu_indices == [0, 1]
    assert record.vram_mb == 14000.0
    assert record.total_vram_mb == 81559.0 + 97871.0
    assert record.gpu_util_pct == 50.0


def test_nvidia_smi_timeout_kills_the_child(tmp_path):
    """Defect 1: a hanging nvidia-smi is killed after its timeout, with its whole group."""
    script = write_fake_nvidia_smi(tmp_path, hang_s=31.5)
    source = NvidiaSmiSource(str(script), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(CollectorError, match=r"did not answer within 0\.3s and was killed"):
        source.snapshot()
    assert time.monotonic() - started < 2.0
    time.sleep(0.1)
    assert processes_left(str(script)) == []
    assert processes_left("sleep 31.5") == []  # the script's own child went with it


def test_hanging_gpu_refresh_is_recorded_and_workers_still_collected(monitor, tmp_path,
                                                                     monkeypatch):
    write_fake_nvidia_smi(tmp_path, hang_s=30)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monitor.spawn("llm", "w", sleeper())
    collector = TelemetryCollector(monitor, build_plugin_manager(),
                                   CollectorSettings(gpu="nvidia-smi", nvidia_smi_timeout_s=0.2))
    assert collector.refresh_devices() == []
    [issue] = collector.refresh_errors
    assert "did not answer within 0.2s" in issue.message
    [record] = collector.collect_all()
    assert record.errors == [] and record.vram_mb == 0.0


def test_nvidia_smi_failure_is_an_error_naming_the_tool(tmp_path):
    bad = tmp_path / "nvidia-smi"
    bad.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate' >&2\n"
                   "exit 9\n")
    bad.chmod(0o755)
    with pytest.raises(CollectorError, match=r"failed \(9\): NVIDIA-SMI has failed"):
        NvidiaSmiSource(str(bad)).snapshot()
    with pytest.raises(CollectorError, match="cannot run"):
        run_with_timeout([str(tmp_path / "missing")], 1.0)


def test_gpu_source_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert open_gpu_source("auto") is None  # no NVML library and no nvidia-smi: no GPU, quietly
    assert open_gpu_source("none") is None
    with pytest.raises(CollectorError, match="NVML is not usable"):
        open_gpu_source("nvml")
    with pytest.raises(CollectorError, match="not found on PATH"):
        open_gpu_source("nvidia-smi")
    write_fake_nvidia_smi(tmp_path)
    assert isinstance(open_gpu_source("auto"), NvidiaSmiSource)
    assert isinstance(open_gpu_source("auto", nvml=StubNvml()), NvmlSource)


def test_gpu_hint_from_cuda_visible_devices(monitor):
    """A worker told to use GPU 1 shows that GPU's real total before it allocates anything."""
    monitor.spawn("llm", "hint", sleeper(), env={"CUDA_VISIBLE_DEVICES": "1", "PATH": "/usr/bin:/bin"})
    manager = build_plugin_manager(disabled=["gpu"],
                                   extra_plugins=[GpuCollector(NvmlSource(StubNvml()))])
    collector = TelemetryCollector(monitor, manager, CollectorSettings())
    collector.refresh_devices()
    record = collector.collect_instance("llm", "hint")
    assert (record.gpu_indices, record.total_vram_mb, record.vram_mb) == ([1], 97871.0, 0.0)
