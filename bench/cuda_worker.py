"""A real CUDA worker for ``./dev gpu-check``: holds VRAM, and either keeps the GPU busy or idles.

    python bench/cuda_worker.py --mode busy|idle --hold-mib N [--duty 0.9] [--cuda auto|torch|ctypes]
                                [--model NAME]

``busy`` runs bf16 matrix products (PyTorch) or a clock-spinning PTX kernel (the CUDA driver
library through ctypes, when PyTorch is not importable) for ``duty`` of every 100 ms; ``idle``
allocates and then does nothing, the case an idle inference server is in. It prints ``ready``
once its memory is held. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import time

SPIN_PTX = b"""
.version 6.0
.target sm_50
.address_size 64

.visible .entry spin(.param .u64 cycles, .param .u64 out)
{
    .reg .pred %p;
    .reg .u64 %start, %now, %elapsed, %limit, %ptr;
    ld.param.u64 %limit, [cycles];
    ld.param.u64 %ptr, [out];
    mov.u64 %start, %clock64;
LOOP:
    mov.u64 %now, %clock64;
    sub.u64 %elapsed, %now, %start;
    setp.lt.u64 %p, %elapsed, %limit;
    @%p bra LOOP;
    st.global.u64 [%ptr], %elapsed;
    ret;
}
\x00"""


class TorchGpu:
    def __init__(self, hold_mib: int) -> None:
        import torch

        self.torch = torch
        self.held = torch.empty(hold_mib * 2**20, dtype=torch.uint8, device="cuda")
        self.a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()

    def work(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(8):
                self.a @ self.b
            self.torch.cuda.synchronize()


class DriverGpu:
    """The CUDA driver API, nothing else: libcuda.so.1 ships with the NVIDIA driver."""

    def __init__(self, hold_mib: int) -> None:
        cuda = self.cuda = ctypes.CDLL("libcuda.so.1")
        self._check(cuda.cuInit(0), "cuInit")
        device, self.context = ctypes.c_int(), ctypes.c_void_p()
        self._check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self._check(cuda.cuCtxCreate_v2(ctypes.byref(self.context), 0, device), "cuCtxCreate")
        self.held = ctypes.c_uint64()
        self._check(cuda.cuMemAlloc_v2(ctypes.byref(self.held), ctypes.c_size_t(hold_mib * 2**20)),
                    "cuMemAlloc")
        self._check(cuda.cuMemsetD8_v2(self.held, 0, ctypes.c_size_t(hold_mib * 2**20)),
                    "cuMemsetD8")
        module, self.kernel = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(SPIN_PTX)),
                    "cuModuleLoadData")
        self._check(cuda.cuModuleGetFunction(ctypes.byref(self.kernel), module, b"spin"),
                    "cuModuleGetFunction")
        self._check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")

    def work(self, seconds: float) -> None:
        cycles = ctypes.c_uint64(int(seconds * 1.0e9))  # ~1 GHz or more: at least ``seconds``
        out = ctypes.c_uint64(self.held.value)
        params = (ctypes.c_void_p * 2)(ctypes.addressof(cycles), ctypes.addressof(out))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            cycles.value = int(max(0.001, deadline - time.monotonic()) * 1.0e9)
            self._check(self.cuda.cuLaunchKernel(self.kernel, 1024, 1, 1, 128, 1, 1, 0, None,
                                                 params, None), "cuLaunchKernel")
            self._check(self.cuda.cuCtxSynchronize(), "cuCtxSynchronize")

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed with CUDA error {result}")


def open_gpu(kind: str, hold_mib: int):
    if kind in ("auto", "torch"):
        try:
            return TorchGpu(hold_mib)
        except ImportError:
            if kind == "torch":
                raise
    return DriverGpu(hold_mib)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("busy", "idle"), required=True)
    parser.add_argument("--hold-mib", type=int, default=1024)
    parser.add_argument("--duty", type=float, default=0.9)
    parser.add_argument("--cuda", choices=("auto", "torch", "ctypes"), default="auto")
    parser.add_argument("--model", default="gpu-check")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    gpu = open_gpu(args.cuda, args.hold_mib)
    print(f"ready ({type(gpu).__name__})", flush=True)
    while True:
        if args.mode == "busy":
            gpu.work(args.duty * 0.1)
            time.sleep((1 - args.duty) * 0.1)
        else:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
