"""The NVML refresh, per GPU: the fast path a tick may wait for (``snapshot``: memory,
utilisation, temperature, power, process lists, health checks) against the per-process
utilisation sample that runs on its own thread (``sample``). Target: the fast path <= 0.3 ms per
GPU, and 8 GPUs at 1 Hz well under 2 % of a core.

Run against the NVML seam (``tests/fakes.StubNvml``: what our own code costs) and, where the host
has an NVIDIA GPU and driver, against the real NVML (what the driver costs too). The stub stands
for hardware this machine lacks; the real run is what counts, and ``./dev gpu-check`` prints it
too.
"""

from __future__ import annotations

import pytest
from rbee.collectors.gpu.nvml import NvmlSource

from tests.fakes import StubNvml

from .conftest import FIGURES, MEDIANS, record


def _real_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return pynvml
    except Exception:
        return None


def _stub_with_work() -> StubNvml:
    nvml = StubNvml([(i, f"GPU-{i:08d}", "stub", 50, 81559, 20000, 61559, 50, 300.0)
                     for i in range(8)])
    for gpu in range(8):
        for pid in range(4):
            nvml.place(gpu=gpu, pid=1000 + 10 * gpu + pid, mib=4096, sm_util=40)
    return nvml


@pytest.fixture(params=["stub", "nvml"])
def source(request):
    if request.param == "stub":
        nvml = _stub_with_work()
    else:
        nvml = _real_nvml()
        if nvml is None:
            pytest.skip("needs an NVIDIA GPU and its driver (libnvidia-ml.so.1)")
    source = NvmlSource(nvml, event_wait_s=0.0)
    yield request.param, source
    source.close()


@pytest.mark.parametrize("path", ["snapshot", "sample"])
def test_nvml_refresh(benchmark, source, path):
    kind, nvml_source = source
    gpus = len(nvml_source.handles)
    nvml_source.sample()
    benchmark(getattr(nvml_source, path))
    record(benchmark, f"nvml {path} [{kind}, {gpus} GPUs]")
    per_gpu_ms = benchmark.stats.stats.median * 1e3 / gpus
    FIGURES[f"nvml {path} per GPU [{kind}]"] = f"{per_gpu_ms:.4f} ms"
    snapshot = MEDIANS.get(f"nvml snapshot [{kind}, {gpus} GPUs]")
    sample = MEDIANS.get(f"nvml sample [{kind}, {gpus} GPUs]")
    if snapshot and sample:
        FIGURES[f"sample/snapshot [{kind}]"] = f"{sample / snapshot:.1f}x"
        FIGURES[f"8 GPUs at 1 Hz, share of a core [{kind}]"] = (
            f"{8 * (snapshot + sample) / gpus * 100:.3f} %")
    if path == "snapshot":
        assert per_gpu_ms <= 0.3
