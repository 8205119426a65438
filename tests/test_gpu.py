"""GPU collection. The GPU is injected, never assumed: NVML is ``tests/fakes.StubNvml`` (pynvml's
interface, error codes and sampling semantics as a real H100 answered them) handed to the source
through its seam, and nvidia-smi is a fake script on PATH printing the real tool's CSV. They stand
for hardware that cannot exist here; everything else in these tests (processes, cgroups) is real,
and the suite passes the same on a host that has a GPU.
"""

from __future__ import annotations

import ctypes
import sys
import time

import pytest
from rbee.collectors.gpu import GpuPlugin
from rbee.collectors.gpu.nvml import NvmlSource
from rbee.collectors.gpu.pick import open_gpu_source
from rbee.collectors.gpu.smi import NvidiaSmiSource, run_with_timeout

from rbee import CollectorError
from rbee.config import CollectorSettings
from rbee.contract import Degraded, GpuFaultKind, GpuUtilSource, Healthy, Unhealthy
from rbee.hive.collection import TelemetryCollector
from rbee.plugin.manager import build_plugin_manager

from .conftest import sleeper
from .fakes import (
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVMLError,
    StubMig,
    StubNvml,
    now_us,
    processes_left,
    write_fake_nvidia_smi,
)
from .hivekit import wait_joined


def spawned(monitor, group: str, instance: str, argv, **options) -> int:
    """A worker started and running its own program in its cgroup: ``spawn`` returns while the
    worker's helper is still joining, and the stub's processes are attributed by cgroup."""
    monitor.spawn(group, instance, argv, **options)
    return wait_joined(monitor, group, instance)


def collector_with(monitor, nvml: StubNvml, **settings) -> TelemetryCollector:
    """A real collector whose GPU plugin sees ``nvml`` (the entry point's real NVML disabled)."""
    manager = build_plugin_manager(disabled=["gpu"], extra_plugins=[GpuPlugin(nvml)])
    return TelemetryCollector(monitor, manager, CollectorSettings(**settings))


def tick(collector: TelemetryCollector) -> None:
    """What the hive does each tick off the event loop: the slow sample, then the refresh."""
    collector.sample_devices()
    collector.refresh_devices()


def test_nvml_snapshot_reads_real_totals_and_processes():
    nvml = StubNvml()
    nvml.place(gpu=1, pid=4242, mib=30000)
    source = NvmlSource(nvml)
    snapshot = source.snapshot()
    assert [(d.index, d.vram_total_mb, d.vram_free_mb) for d in snapshot.devices] == [
        (0, 81559.0, 80535.0), (1, 97871.0, 77391.0)]
    device = snapshot.devices[1]
    assert device.power_w is None and device.temperature_c == 55
    assert [e.message for e in device.errors] == ["power: Not Supported"]  # null, with the reason
    assert (device.util_pct, device.health) == (37.0, Healthy())
    [placed] = snapshot.processes[4242]
    assert (placed.gpu_index, placed.uuid, placed.vram_mb) == (1, device.uuid, 30000.0)
    assert nvml.calls.get("process_utilization", 0) == 0  # never on the refresh's path
    source.close()
    assert (nvml.initialised, nvml.shutdowns) == (1, 1)


def test_idle_worker_holding_memory_is_idle_and_busy_one_busy(monitor):
    """The exact sequence measured on an H100: ``idle-0`` holds 3.5 GiB and has one old sample
    (smUtil 1, from its start) and none after; ``busy-0`` runs ~90 %; the device reads 98 %.
    The idle worker is at 0 % (source: process), not the device's 98 %."""
    busy = spawned(monitor, "llm", "busy-0", sleeper())
    idle = spawned(monitor, "llm", "idle-0", sleeper())
    nvml = StubNvml()
    nvml.gpus[0].util = 98
    nvml.place(gpu=0, pid=busy, mib=10954)
    nvml.place(gpu=0, pid=idle, mib=3624)
    nvml.run(0, idle, sm_util=1, at_us=now_us() - 60_000_000)  # its start, a minute ago
    collector = collector_with(monitor, nvml)
    for _ in range(3):
        nvml.run(0, busy, sm_util=88, mem_util=40)
        nvml.run(0, busy, sm_util=92, mem_util=44)
        tick(collector)
        records = {r.instance: r for r in collector.collect_all()}
        assert (records["idle-0"].gpu_util_pct, records["idle-0"].gpu_util_source) == (
            0.0, GpuUtilSource.PROCESS)
        assert records["busy-0"].gpu_util_pct == 90.0  # the average of its samples this tick
        [use] = records["busy-0"].gpus
        assert (use.util_pct, use.mem_util_pct, use.vram_mb) == (90.0, 42.0, 10954.0)
        assert use.util_source is GpuUtilSource.PROCESS and use.sample_age_s < 1.0
    # once per GPU per tick: both before the first refresh, then only the one in use
    assert nvml.calls["process_utilization"] == 2 + 1 + 1


@pytest.mark.parametrize("query", ["single call", "pynvml wrapper"])
def test_per_process_query_counts_every_sample(query):
    """The one-call query grows its buffer when the driver has more samples than room (here 300
    processes); pynvml's own two-call wrapper, where the module has no C entry point, agrees."""
    nvml = StubNvml()
    if query == "pynvml wrapper":
        nvml._nvmlGetFunctionPointer = None
    source = NvmlSource(nvml)
    for pid in range(1000, 1300):
        nvml.run(0, pid, sm_util=pid % 100)
    source.sample()
    snapshot = source.snapshot()
    util = source.utilisation(nvml.gpus[0].uuid, snapshot)
    assert len(util.per_pid) == 300 and util.of(1042) == (42.0, 0.0)
    source.sample()  # nothing ran since: every process at 0 %
    assert source.utilisation(nvml.gpus[0].uuid, snapshot).of(1042) == (0.0, 0.0)


def _lookup_raises(nvml):
    def lookup(name):
        raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)  # a library without the symbol
    nvml._nvmlGetFunctionPointer = lookup


def _lookup_gone(nvml):
    nvml._nvmlGetFunctionPointer = None  # a pynvml release without the private lookup


def _call_misfits(nvml):
    def lookup(name):
        def call(handle, buffer, count_ref, since):
            raise ctypes.ArgumentError("argument 2: wrong type")  # the struct changed shape
        return call
    nvml._nvmlGetFunctionPointer = lookup


@pytest.mark.parametrize("breakage", [_lookup_raises, _lookup_gone, _call_misfits])
def test_pynvml_private_lookup_failing_falls_back_to_the_public_wrapper(breakage):
    """``_nvmlGetFunctionPointer`` is pynvml's private lookup (no GPU here: the NVML stub plays
    pynvml): missing, raising NVMLError, or its function failing with a ctypes error, the
    per-process figures come from pynvml's public wrapper, and the hive keeps sampling."""
    nvml = StubNvml()
    breakage(nvml)
    wrapper_calls = []
    wrapper = nvml.nvmlDeviceGetProcessUtilization
    nvml.nvmlDeviceGetProcessUtilization = lambda *args: wrapper_calls.append(args) or wrapper(*args)
    source = NvmlSource(nvml)
    nvml.place(gpu=0, pid=4242, mib=1024)
    nvml.run(0, 4242, sm_util=55, mem_util=11)
    snapshot = source.snapshot()
    source.sample()
    util = source.utilisation(nvml.gpus[0].uuid, snapshot)
    assert util.of(4242) == (55.0, 11.0) and util.source is GpuUtilSource.PROCESS
    assert util.problem is None
    nvml.run(0, 4242, sm_util=65)
    source.sample()
    assert source.utilisation(nvml.gpus[0].uuid, snapshot).of(4242) == (65.0, 0.0)
    assert len(wrapper_calls) == 2


def test_gpus_without_a_process_are_not_queried_per_process():
    nvml = StubNvml()
    source = NvmlSource(nvml)
    source.snapshot()
    source.sample()
    assert nvml.calls.get("process_utilization", 0) == 0  # both GPUs empty: nothing to ask
    nvml.place(gpu=1, pid=4242, mib=1024)
    nvml.run(1, 4242, sm_util=30)
    snapshot = source.snapshot()
    source.sample()
    assert nvml.calls["process_utilization"] == 1  # GPU 1 only
    assert source.utilisation(nvml.gpus[1].uuid, snapshot).of(4242) == (30.0, 0.0)


def test_no_process_ran_not_found_means_zero(monitor):
    """With no sample at all the driver answers NVML_ERROR_NOT_FOUND: every process is at 0 %."""
    pid = spawned(monitor, "llm", "holder", sleeper())
    nvml = StubNvml()
    nvml.place(gpu=1, pid=pid, mib=2048)
    collector = collector_with(monitor, nvml)
    tick(collector)
    record = collector.collect_instance("llm", "holder")
    assert (record.gpu_util_pct, record.gpu_util_source, record.errors) == (
        0.0, GpuUtilSource.PROCESS, [])


def test_unsupported_per_process_falls_back_to_the_device_and_says_so(monitor):
    pid = spawned(monitor, "llm", "w", sleeper())
    nvml = StubNvml()
    nvml.gpus[1].per_process_util = False
    nvml.place(gpu=1, pid=pid, mib=2048)
    collector = collector_with(monitor, nvml)
    tick(collector)
    record = collector.collect_instance("llm", "w")
    assert (record.gpu_util_pct, record.gpu_util_source) == (37.0, GpuUtilSource.DEVICE)
    assert record.gpus[0].util_source is GpuUtilSource.DEVICE


def test_unknown_is_null_with_the_reason_never_zero(monitor):
    """Neither per-process nor device utilisation supported: the figure is None, the reason is in
    ``errors``, and the queen never takes the worker for idle."""
    pid = spawned(monitor, "llm", "w", sleeper())
    nvml = StubNvml()
    nvml.gpus[0].per_process_util = False
    nvml.gpus[0].util = None
    nvml.place(gpu=0, pid=pid, mib=None)  # the driver withholds per-process memory too
    collector = collector_with(monitor, nvml)
    tick(collector)
    record = collector.collect_instance("llm", "w")
    assert record.gpu_util_pct is None and record.gpus[0].util_pct is None
    assert record.gpus[0].vram_mb is None
    messages = [e.message for e in record.errors]
    assert any("utilisation unknown: utilisation: Not Supported" in m for m in messages)
    assert any("no VRAM per process" in m for m in messages)
    [device] = [d for d in collector.devices if d.index == 0]
    assert device.util_pct is None and "utilisation: Not Supported" in [
        e.message for e in device.errors]


def test_before_the_first_sample_utilisation_is_unknown(monitor):
    pid = spawned(monitor, "llm", "w", sleeper())
    nvml = StubNvml()
    nvml.place(gpu=0, pid=pid, mib=1024)
    collector = collector_with(monitor, nvml)
    collector.refresh_devices()  # the refresh ran, the sampler not yet
    record = collector.collect_instance("llm", "w")
    assert record.gpu_util_pct is None
    assert "no per-process sample yet" in record.errors[0].message


def test_worker_on_two_gpus_gets_a_per_gpu_breakdown_children_included(cgroup_monitor):
    """A worker's GPU use is that of every process in its cgroup, its children too, per GPU."""
    parent = [sys.executable, "-c",
              "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"]
    monitor = cgroup_monitor
    pid = spawned(monitor, "llm", "gpu", parent)
    deadline = time.monotonic() + 5
    while len(monitor.get("llm", "gpu").list_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    child = next(p for p in monitor.get("llm", "gpu").list_pids() if p != pid)
    nvml = StubNvml()
    nvml.place(gpu=0, pid=child, mib=12000, sm_util=40)
    nvml.place(gpu=1, pid=pid, mib=2000, sm_util=10)
    collector = collector_with(monitor, nvml)
    tick(collector)
    record = collector.collect_instance("llm", "gpu")
    assert record.gpu_indices == [0, 1]
    assert [(u.index, u.vram_mb, u.util_pct) for u in record.gpus] == [
        (0, 12000.0, 40.0), (1, 2000.0, 10.0)]
    assert (record.vram_mb, record.total_vram_mb, record.gpu_util_pct) == (
        14000.0, 81559.0 + 97871.0, 50.0)


def test_mig_instances_are_devices_and_processes_are_attributed_to_them(monitor):
    """MIG through the NVML seam, modelled on the real API (a lent machine's MIG mode is never
    changed): GPU 0 in MIG mode with two instances; a worker on the second one."""
    pid = spawned(monitor, "llm", "mig", sleeper())
    nvml = StubNvml()
    nvml.gpus[0].mig = [StubMig("MIG-aaaa-0001", 1, total_mib=40192, used_mib=1024),
                        StubMig("MIG-aaaa-0002", 2, total_mib=19968, used_mib=8192,
                                processes=[(pid, 8000)])]
    collector = collector_with(monitor, nvml)
    tick(collector)
    migs = [d for d in collector.devices if d.mig_parent_uuid is not None]
    assert [(d.uuid, d.index, d.mig_instance_id, d.vram_total_mb, d.vram_free_mb) for d in migs] == [
        ("MIG-aaaa-0001", 0, 1, 40192.0, 39168.0), ("MIG-aaaa-0002", 0, 2, 19968.0, 11776.0)]
    assert {d.mig_parent_uuid for d in migs} == {nvml.gpus[0].uuid}
    assert nvml.gpus[0].uuid not in {d.uuid for d in collector.devices}  # shown as its instances
    assert all(d.util_pct is None for d in migs)
    record = collector.collect_instance("llm", "mig")
    [use] = record.gpus
    assert (use.uuid, use.index, use.vram_mb, use.util_pct) == ("MIG-aaaa-0002", 0, 8000.0, None)
    assert record.total_vram_mb == 19968.0
    assert "not reported for MIG instances" in record.errors[0].message


@pytest.mark.parametrize(("fault", "kind", "fatal"), [
    (lambda g: setattr(g, "ecc_uncorrected", 2), GpuFaultKind.ECC_UNCORRECTED, True),
    (lambda g: setattr(g, "retired_pages_pending", True), GpuFaultKind.RETIRED_PAGES_PENDING, True),
    (lambda g: setattr(g, "remapped_rows", (3, 1, 1, 0)), GpuFaultKind.REMAPPED_ROWS_PENDING, True),
    (lambda g: setattr(g, "remapped_rows", (0, 0, 0, 1)), GpuFaultKind.ROW_REMAP_FAILURE, True),
    (lambda g: setattr(g, "clock_event_reasons", 0x40), GpuFaultKind.THERMAL_SLOWDOWN, False),
    (lambda g: setattr(g, "clock_event_reasons", 0x80 | 0x4), GpuFaultKind.POWER_BRAKE, False),
    (lambda g: setattr(g, "clock_event_reasons", 0x8), GpuFaultKind.HW_SLOWDOWN, False),
])
def test_gpu_health_checks(fault, kind, fatal):
    nvml = StubNvml()
    nvml.gpus[1].clock_event_reasons = 0x1 | 0x4  # idle and the power cap: a healthy GPU
    fault(nvml.gpus[1])
    devices = NvmlSource(nvml).snapshot().devices
    assert devices[0].health == Healthy() and devices[0].faults == []
    assert [f.kind for f in devices[1].faults] == [kind]
    assert devices[1].faults[0].fatal is fatal
    assert isinstance(devices[1].health, Unhealthy if fatal else Degraded)
    assert kind.value in devices[1].health.reason


def test_xid_events_fatal_stay_others_fade():
    nvml = StubNvml()
    clock = [1000.0]
    source = NvmlSource(nvml, xid_window_s=60, clock=lambda: clock[0])
    nvml.xid(gpu=0, code=43)  # an application's fault: degraded for a while
    nvml.xid(gpu=1, code=79)  # fallen off the bus: unhealthy until the hive restarts
    source.sample()
    devices = source.snapshot().devices
    assert isinstance(devices[0].health, Degraded) and "Xid 43" in devices[0].health.reason
    assert isinstance(devices[1].health, Unhealthy)
    assert "Xid 79 (GPU has fallen off the bus)" in devices[1].health.reason
    clock[0] += 61
    source.sample()
    devices = source.snapshot().devices
    assert devices[0].health == Healthy() and isinstance(devices[1].health, Unhealthy)
    source.close()
    assert nvml._event_sets == 0


def test_unhealthy_gpu_degrades_the_hive(tmp_path):
    from rbee.config import HiveConfig, parse_config
    from rbee.hive.agent import HiveAgent

    from .conftest import RUN_ROOT

    nvml = StubNvml()
    nvml.gpus[1].ecc_uncorrected = 5
    config = parse_config({"id": "h", "cgroup": {"backend": "none",
                                                  "root": f"{RUN_ROOT}/unhealthy-gpu"},
                           "collect": {"disabled_plugins": ["gpu"]}}, HiveConfig)
    agent = HiveAgent(config, extra_plugins=[GpuPlugin(nvml)])
    try:
        assert agent.health() == Healthy()
        agent.collector.refresh_devices()
        health = agent.health()
        assert isinstance(health, Degraded)
        assert f"GPU 1 ({nvml.gpus[1].uuid}) unhealthy: ecc_uncorrected: 5 uncorrected" in health.reason
    finally:
        agent.collector.close()


def test_device_figures_carry_their_age(monitor):
    clock = [50.0]
    manager = build_plugin_manager(disabled=["gpu"], extra_plugins=[GpuPlugin(StubNvml())])
    collector = TelemetryCollector(monitor, manager, CollectorSettings(), clock=lambda: clock[0])
    collector.refresh_devices()
    clock[0] += 0.75
    assert [d.sample_age_s for d in collector.devices_now()] == [0.75, 0.75]
    collector.close()


def test_nvidia_smi_timeout_kills_the_child(tmp_path):
    """Defect 1: a hanging nvidia-smi is killed after its timeout, with its whole group."""
    script = write_fake_nvidia_smi(tmp_path, hang_s=31.5)
    source = NvidiaSmiSource(str(script), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(CollectorError, match=r"did not answer within 0\.3s and was killed"):
        source.snapshot()
    assert time.monotonic() - started < 2.0
    deadline = time.monotonic() + 5  # killed; gone as soon as the kernel has reaped them
    while processes_left(str(script)) or processes_left("sleep 31.5"):
        assert time.monotonic() < deadline, "the hung nvidia-smi or its child was left running"
        time.sleep(0.02)


def test_nvidia_smi_gives_device_figures_marked_device_and_health(tmp_path, monitor, monkeypatch):
    pid = spawned(monitor, "llm", "w", sleeper())
    write_fake_nvidia_smi(tmp_path, apps=[(pid, 1, 4000)], health_rows=[
        "0, 0, No, No, No, Not Active, Not Active, Not Active, Not Active",
        "1, 3, No, Yes, No, Not Active, Active, Not Active, Not Active"])
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    collector = TelemetryCollector(monitor, build_plugin_manager(),
                                   CollectorSettings(gpu="nvidia-smi"))
    tick(collector)
    record = collector.collect_instance("llm", "w")
    assert (record.gpu_util_pct, record.gpu_util_source, record.vram_mb) == (
        37.0, GpuUtilSource.DEVICE, 4000.0)
    gpu0, gpu1 = collector.devices
    assert (gpu0.health, gpu0.mem_util_pct) == (Healthy(), 3.0)
    assert {f.kind for f in gpu1.faults} == {GpuFaultKind.ECC_UNCORRECTED,
                                             GpuFaultKind.REMAPPED_ROWS_PENDING,
                                             GpuFaultKind.THERMAL_SLOWDOWN}
    assert isinstance(gpu1.health, Unhealthy)
    collector.close()


def test_hanging_gpu_refresh_is_recorded_and_workers_still_collected(monitor, tmp_path,
                                                                     monkeypatch):
    write_fake_nvidia_smi(tmp_path, hang_s=30)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    spawned(monitor, "llm", "w", sleeper())
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
    """"No GPU" is injected (an NVML whose library is missing, an empty PATH), so this holds on a
    GPU host too."""
    no_driver = StubNvml(driver=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert open_gpu_source("auto", nvml=no_driver) is None  # no NVML, no nvidia-smi: quietly none
    assert open_gpu_source("none") is None
    with pytest.raises(CollectorError, match="NVML is not usable: NVML Shared Library Not Found"):
        open_gpu_source("nvml", nvml=no_driver)
    with pytest.raises(CollectorError, match="not found on PATH"):
        open_gpu_source("nvidia-smi", nvml=no_driver)
    write_fake_nvidia_smi(tmp_path)
    assert isinstance(open_gpu_source("auto", nvml=no_driver), NvidiaSmiSource)
    assert isinstance(open_gpu_source("auto", nvml=StubNvml()), NvmlSource)


def test_gpu_hint_from_cuda_visible_devices(monitor):
    """A worker told to use GPU 1 shows that GPU's real total before it allocates anything."""
    spawned(monitor, "llm", "hint", sleeper(), env={"CUDA_VISIBLE_DEVICES": "1", "PATH": "/usr/bin:/bin"})
    collector = collector_with(monitor, StubNvml())
    tick(collector)
    record = collector.collect_instance("llm", "hint")
    assert (record.gpu_indices, record.total_vram_mb, record.vram_mb) == ([1], 97871.0, 0.0)
    assert (record.gpu_util_pct, record.gpus[0].util_pct) == (0.0, 0.0)
