"""A worker's detail in the interactive ``rbee top``: its figures now, its notes, its plugin
figures, and sparklines of its last minutes from the queen's ``GET /v1/history`` (CPU %, GPU %,
VRAM, the engine's queue and KV cache). Esc goes back; ``q`` quits."""

from __future__ import annotations

import httpx
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from ..columns import Row
from ..contract import WorkerTelemetry, on_gpu, paths
from ..terminal import WORKER_COLUMNS, printable, row_notes, sparkline
from .feed import FleetFeed
from .looks import worker_key

SERIES = (("cpu_pct", "CPU %"), ("gpu_util_pct", "GPU %"), ("vram_mb", "VRAM MB"),
          ("engine_waiting", "queue"), ("kv_cache_pct", "KV cache %"))
"""The history shown, as the queen names each figure, with its label."""
SINCE_S = 300
STEP_S = 5
REFRESH_S = 5.0


class DetailScreen(Screen[None]):
    """One worker, by its fleet-wide id (``hive/group/instance``)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("q", "app.quit", "Quit")]

    def __init__(self, feed: FleetFeed, key: str) -> None:
        super().__init__()
        self.feed = feed
        self.key = key
        self.series: dict[str, list[float | None]] = {}
        self.problem = "history: asking the queen"

    def compose(self) -> ComposeResult:
        yield Static(id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.redraw()
        self.fetch()
        self.set_interval(REFRESH_S, self.fetch)

    @work(exclusive=True)
    async def fetch(self) -> None:
        """The worker's history; a failure is said on screen and tried again next time."""
        hive, group, instance = self.key.split("/")
        params = {"hive": hive, "group": group, "instance": instance, "since": str(SINCE_S),
                  "step": str(STEP_S), "metric": ",".join(name for name, _ in SERIES)}
        feed = self.feed
        try:
            async with httpx.AsyncClient(base_url=feed.queen_url, verify=feed.verify,
                                         headers=feed.headers, timeout=REFRESH_S) as client:
                response = await client.get(paths.HISTORY, params=params)
            if response.status_code != 200:
                self.problem = f"history: HTTP {response.status_code} from the queen"
            else:
                self.series = {s["metric"]: s["values"] for s in response.json()["series"]
                               if s.get("instance") == instance}
                self.problem = ""
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.problem = f"history: {type(exc).__name__} from {feed.queen_url}"
        self.redraw()

    def _row(self) -> Row | None:
        with self.feed.lock:
            return next((row for row in self.feed.view.rows() if worker_key(row) == self.key),
                        None)

    def redraw(self) -> None:
        row = self._row()
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{printable(self.key)}\n", style="bold")
        if row is None:
            text.append("no longer in the fleet\n", style="yellow")
        else:
            for column in WORKER_COLUMNS[2:-2]:
                text.append(f"{column.title}: ", style="dim")
                text.append(f"{printable(column.cell(row))}   ")
            text.append("\n")
            if notes := row_notes(row):
                text.append(printable(", ".join(notes)) + "\n", style="yellow")
            if row.worker.metrics:
                text.append("plugins: ", style="dim")
                text.append("  ".join(f"{printable(k)}={v:.4g}"
                                      for k, v in sorted(row.worker.metrics.items())) + "\n")
        text.append(f"\nlast {SINCE_S // 60} minutes, a point every {STEP_S} s\n", style="bold")
        width = max(10, self.size.width - 40)
        for name, label in SERIES:
            values = self.series.get(name, [])[-width:]
            known = [v for v in values if v is not None]
            text.append(f"{label:<12}")
            text.append(f"{sparkline(values, _top(name, known, row)):<{width}}", style="cyan")
            text.append(f"  now {_value(values[-1] if values else None):>7}"
                        f"  max {_value(max(known) if known else None):>7}\n")
        if self.problem:
            text.append(printable(self.problem), style="red")
        self.query_one("#detail", Static).update(text)


def _top(name: str, known: list[float], row: Row | None) -> float:
    """The figure a full bar stands for: 100 for a percentage (more for CPU % past one core),
    the worker's GPU memory for VRAM, the peak for the queue."""
    peak = max(known, default=0.0)
    worker: WorkerTelemetry | None = row.worker if row else None
    if name == "vram_mb":
        return worker.total_vram_mb if worker and on_gpu(worker) and worker.total_vram_mb \
            else max(peak, 1.0)
    if name == "engine_waiting":
        return max(peak, 1.0)
    return max(100.0, peak)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
