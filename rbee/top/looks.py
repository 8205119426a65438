"""How the interactive ``rbee top`` draws: colours by level, bars, the GPUs under the table."""

from __future__ import annotations

from rich.text import Text

from ..columns import BAD, OK, WARN, Row, level_of
from ..contract import GpuDevice, Healthy, describe_health, worker_id
from ..terminal import printable

LEVEL_STYLE = {OK: "", WARN: "yellow", BAD: "bold red"}
BAR_STYLE = {OK: "green", WARN: "yellow", BAD: "red"}
EIGHTHS = " ▏▎▍▌▋▊▉"


def worker_key(row: Row) -> str:
    """The row's key in the table: the worker's fleet-wide id."""
    return worker_id(row.hive, row.worker)


def bar(fraction: float | None, width: int, level: int = OK) -> Text:
    """``fraction`` (0 to 1) of ``width`` cells, to an eighth of a cell; blank when unknown."""
    if fraction is None:
        return Text(" " * width)
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (EIGHTHS[part] if part else "")
    text = Text(filled, style=BAR_STYLE[level])
    text.append("·" * (width - len(filled)), style="dim")
    return text


def gpu_lines(gpus: list[tuple[str, GpuDevice]], width: int, most: int) -> Text:
    """One line per GPU: hive, index (``<gpu>/mig<id>``), utilisation and VRAM bars, health;
    the ``most`` first, then how many more there are."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for hive, device in gpus[:most]:
        where = (f"{device.index}/mig{device.mig_instance_id}" if device.mig_parent_uuid
                 else str(device.index))
        util = device.util_pct
        used = device.vram_used_mb / device.vram_total_mb if device.vram_total_mb else None
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{printable(hive)[:14]:<14} GPU {where:<7} {printable(device.name)[:20]:<20} ")
        line.append("util ")
        line.append_text(bar(None if util is None else util / 100, 10, level_of(util, 80, 95)))
        line.append(f" {'?' if util is None else f'{util:.0f}'}%".ljust(6) + " vram ")
        line.append_text(bar(used, 10, level_of(used, 0.9, 0.97)))
        line.append(f" {device.vram_used_mb:.0f}/{device.vram_total_mb:.0f} MB  ")
        if isinstance(device.health, Healthy):
            line.append("ok", style="green")
        else:
            line.append(printable(describe_health(device.health)), style="bold red")
        line.truncate(width, overflow="ellipsis")
        if text:
            text.append("\n")
        text.append_text(line)
    if len(gpus) > most:
        text.append(f"\n… and {len(gpus) - most} more GPUs (filter by hive to see them)", style="dim")
    return text

