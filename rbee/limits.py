"""Worker resource limits as users write them ("200%", "4G") and as cgroups need them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._errors import LimitError

CPU_PERIOD_US = 100_000
"""The CFS period rbee writes; quota = percent of one core x period / 100."""

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_CPU = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*%\s*$")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True, slots=True)
class Limits:
    """What a worker may use. None means unlimited."""

    cpu_pct: float | None = None
    """Percent of one core: 50.0 is half a core, 200.0 two cores."""
    memory_bytes: int | None = None

    @property
    def memory_mb(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / 2**20

    @property
    def cpu_quota_us(self) -> int | None:
        if self.cpu_pct is None:
            return None
        return max(1000, round(self.cpu_pct * CPU_PERIOD_US / 100))


def parse_cpu_limit(text: str | None) -> float | None:
    """``"N%"`` with N > 0 (percent of one core) → N as a float; None stays None."""
    if text is None:
        return None
    match = _CPU.match(str(text))
    if not match:
        raise LimitError(
            f"invalid CPU limit {text!r}: write a percentage of one core, e.g. '50%' or '200%'"
        )
    value = float(match.group(1))
    if value <= 0:
        raise LimitError(f"invalid CPU limit {text!r}: the percentage must be greater than 0")
    return value


def parse_memory_limit(text: str | int | None) -> int | None:
    """Bytes, or a number with a binary suffix: ``"512M"``, ``"4G"``, ``"4GiB"``, ``1048576``."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise LimitError(f"invalid memory limit {text!r}: write bytes or a size such as '512M'")
    if isinstance(text, int):
        value = text
    else:
        match = _MEMORY.match(text)
        if not match:
            raise LimitError(
                f"invalid memory limit {text!r}: write bytes or a size such as '512M' or '4G'"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise LimitError(f"invalid memory limit {text!r}: the size must be greater than 0")
    return value


def parse_limits(cpu: str | None = None, memory: str | int | None = None) -> Limits:
    return Limits(cpu_pct=parse_cpu_limit(cpu), memory_bytes=parse_memory_limit(memory))
