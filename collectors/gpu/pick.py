"""Where GPU numbers come from: NVML (``pynvml`` of the nvidia-ml-py distribution), else
nvidia-smi, else nothing. ``open_gpu_source`` picks one; ``source.py`` says what each answers.
"""

from __future__ import annotations

import logging

from rbee._errors import CollectorError

from .nvml import NvmlSource
from .smi import NvidiaSmiSource
from .source import GpuSource

log = logging.getLogger(__name__)


def open_gpu_source(kind: str, nvidia_smi_path: str = "nvidia-smi", timeout_s: float = 2.0,
                    nvml: object | None = None, *, event_wait_s: float = 0.01,
                    xid_window_s: float = 300.0) -> GpuSource | None:
    """The source for ``kind`` ("auto", "nvml", "nvidia-smi", "none"); None when there is no GPU.

    "auto" prefers NVML, then nvidia-smi when it is on PATH, then nothing, quietly: a host without
    a GPU is normal. An explicit choice that cannot work raises CollectorError. ``nvml`` is the
    NVML seam: the ``pynvml`` module when None, else an object with its interface (the tests'
    stub, which also stands for "no driver" on a GPU host).
    """
    if kind == "none":
        return None
    if kind in ("auto", "nvml"):
        try:
            return NvmlSource(nvml, event_wait_s=event_wait_s, xid_window_s=xid_window_s)
        except Exception as exc:  # NVMLError, or the library missing altogether
            if kind == "nvml":
                raise CollectorError(f"NVML is not usable: {exc}", collector="gpu") from exc
            log.debug("NVML not usable (%s); trying nvidia-smi", exc)
    from shutil import which

    if which(nvidia_smi_path) is None:
        if kind == "nvidia-smi":
            raise CollectorError(f"{nvidia_smi_path} not found on PATH", collector="gpu")
        return None
    return NvidiaSmiSource(nvidia_smi_path, timeout_s)
