"""The interactive ``rbee top`` (textual): the fleet's workers as a table that fits the terminal,
coloured where a figure needs attention, sorted and filtered from the keyboard; Enter opens a
worker's detail with its history (``rbee.top.detail``).

Keys: ``q`` quits, ``s`` sorts by the next column (``S`` reverses), ``/`` filters (hive, worker
or model; Enter keeps the filter, Esc clears it), Enter opens the worker under the cursor, Esc
goes back.

textual runs on asyncio and the feed on trio, so the feed runs ``trio.run`` in a thread of its
own; it marks the view changed (never waiting for the app), the app redraws changed views on a
timer, and the feed is cancelled through its trio token and joined when the app ends.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence

import trio
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Input, Static

from ..columns import WARN, Column, Row, fit, with_metrics
from ..terminal import WORKER_COLUMNS, printable
from .feed import FleetFeed
from .looks import LEVEL_STYLE, bar, gpu_lines, worker_key

REDRAW_S = 0.25
"""The most often the table is redrawn for the feed's changes (a key redraws at once)."""
BAR_WIDTH = 6
"""Characters of a gauge's bar, after its figure (GPU%, VRAM, KV%)."""
GPU_LINES = 8
"""The most GPUs listed under the table (then a line saying how many more)."""
EDGE = 4
"""Columns kept free at the right: the table's vertical scroll bar."""


TABLE_ACTIONS = frozenset({"sort", "reverse", "filter", "detail", "clear_filter"})


def matches(row: Row, text: str) -> bool:
    """The filter: ``text`` (any case) in the row's hive, ``group/instance`` or model."""
    if not text:
        return True
    worker = row.worker
    where = f"{row.hive}\n{worker.group}/{worker.instance}\n{worker.model or ''}"
    return text.lower() in where.lower()


class TopApp(App[None]):
    """The live fleet, one row per worker."""

    TITLE = "rbee top"
    CSS = """
    #status { height: 1; }
    #workers { height: 1fr; }
    #gpus { height: auto; max-height: 10; }
    #filter { dock: bottom; display: none; }
    #filter.shown { display: block; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),  # as in top(1)
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse"),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "detail", "Detail", show=True),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, queen_url: str, verify: ssl.SSLContext | bool = True,
                 headers: dict[str, str] | None = None, metrics: Sequence[str] = ()) -> None:
        super().__init__()
        self.feed = FleetFeed(queen_url, verify, headers)
        self.columns: tuple[Column, ...] = tuple(
            c._replace(width=c.width + 1 + BAR_WIDTH) if c.gauge else c
            for c in with_metrics(WORKER_COLUMNS, metrics))
        self.sort_by: str | None = None
        self.descending = True
        self.filter_text = ""
        self.rows: list[Row] = []
        self._shown: list[tuple[Column, int]] = []
        self._dirty = False
        self._cells: dict[str, tuple[Row, tuple[Text, ...]]] = {}
        self._redraw_s = REDRAW_S
        self._last_redraw = 0.0
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"rbee: connecting to the queen at {self.feed.queen_url}", id="status")
        yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
        yield Static(id="gpus")
        yield Input(placeholder="filter: hive, worker or model", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self._thread = threading.Thread(target=trio.run, args=(self._follow,), daemon=True,
                                        name="rbee-top-feed")
        self._thread.start()
        self.set_interval(REDRAW_S, self._redraw_if_changed)

    async def _follow(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await self.feed.run(self._changed)
            except Exception as exc:  # shown, not lost with the thread: the view stops updating
                self.feed.problem = f"the feed stopped: {type(exc).__name__}: {exc}"
                self._dirty = True

    def _changed(self) -> None:
        """From the feed's thread: mark the view changed (a large fleet changes hundreds of
        times a second; the table is redrawn at most every ``REDRAW_S``)."""
        self._dirty = True

    def _redraw_if_changed(self) -> None:
        """A large fleet takes longer to draw: then the table is redrawn less often, so drawing
        takes at most a quarter of the time (for 800 workers, about once a second)."""
        now = time.monotonic()
        if self._dirty and now - self._last_redraw >= self._redraw_s:
            self._dirty = False
            self._last_redraw = now
            self.redraw()
            self._redraw_s = max(REDRAW_S, 4 * (time.monotonic() - now))

    def on_unmount(self) -> None:
        if self._token is not None and self._scope is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The table's keys act only while the table is shown (not under a worker's detail)."""
        return not (action in TABLE_ACTIONS and len(self.screen_stack) > 1)

    def on_resize(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """The status line, the workers' table and the GPUs, from the feed's view now."""
        with self.feed.lock:
            rows = self.feed.view.rows()
            gpus = self.feed.view.gpus()
            rows = [row for row in rows if matches(row, self.filter_text)]
            header = self.feed.view.header(len(rows))
        if self.filter_text:  # the GPUs of the hives shown
            hives = {row.hive for row in rows}
            gpus = [gpu for gpu in gpus if gpu[0] in hives]
        self.rows = self._sorted(rows)
        self._status(header)
        self._table()
        self.query_one("#gpus", Static).update(gpu_lines(gpus, self.size.width, GPU_LINES))
        if (screen := self.screen) is not self.screen_stack[0] and hasattr(screen, "redraw"):
            screen.redraw()

    def _status(self, header: str) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.feed.problem:
            text.append(f"{printable(self.feed.problem)}  ", style="bold red")
        elif not self.feed.streamed:
            text.append(f"connecting to the queen at {self.feed.queen_url}  ", style="yellow")
        text.append(header)
        if self.sort_by:
            text.append(f"  sort: {self.sort_by} {'v' if self.descending else '^'}", style="cyan")
        if self.filter_text:
            text.append(f"  filter: {printable(self.filter_text)}", style="cyan")
        self.query_one("#status", Static).update(text)

    def _sorted(self, rows: list[Row]) -> list[Row]:
        column = next((c for c in self.columns if c.title == self.sort_by), None)
        if column is None or column.sort is None:
            return rows
        return sorted(rows, key=column.sort, reverse=self.descending)

    def _table(self) -> None:
        table = self.query_one("#workers", DataTable)
        shown = fit(self.columns, max(20, self.size.width - EDGE))
        selected = self._selected_key()
        if [(c.title, w) for c, w in shown] != [(c.title, w) for c, w in self._shown]:
            table.clear(columns=True)
            for column, width in shown:
                table.add_column(Text(column.title, style="bold"), width=width, key=column.title)
            self._shown = shown
            self._cells = {}
        else:
            table.clear()
        cells = {}
        for row in self.rows:
            key = worker_key(row)
            cached = self._cells.get(key)
            if cached is None or cached[0].worker is not row.worker or cached[0][2:] != row[2:]:
                cached = (row, tuple(self._cell(row, c, w) for c, w in shown))
            cells[key] = cached
            table.add_row(*cached[1], key=key)
        self._cells = cells  # a row whose worker, note and trend are unchanged is not redrawn
        keys = list(cells)
        if selected in keys:
            table.move_cursor(row=keys.index(selected), scroll=False)

    def _cell(self, row: Row, column: Column, width: int) -> Text:
        value = printable(column.cell(row))
        level = column.level(row)
        style = LEVEL_STYLE[level] + (" dim" if row.stale and level < WARN else "")
        if column.gauge is None:
            text = Text(value.rjust(width) if column.numeric else value, style=style)
        else:
            text = Text(value.rjust(width - 1 - BAR_WIDTH) + " ", style=style)
            text.append_text(bar(column.gauge(row), BAR_WIDTH, level))
        text.truncate(width, overflow="ellipsis")
        return text

    def _selected_key(self) -> str | None:
        table = self.query_one("#workers", DataTable)
        if not self.rows or table.cursor_row < 0 or table.cursor_row >= len(self.rows):
            return None
        return worker_key(self.rows[table.cursor_row])

    def action_sort(self) -> None:
        """The next sortable column on screen; after the last, back to hive order."""
        titles = [c.title for c, _ in self._shown if c.sort is not None]
        at = titles.index(self.sort_by) + 1 if self.sort_by in titles else 0
        self.sort_by = titles[at] if at < len(titles) else None
        column = next((c for c in self.columns if c.title == self.sort_by), None)
        self.descending = bool(column and column.numeric)  # figures: largest first
        self.redraw()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        self._close_filter()

    def _close_filter(self) -> None:
        self.query_one("#filter", Input).remove_class("shown")
        self.query_one("#workers", DataTable).focus()
        self.redraw()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._close_filter()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_detail()

    def action_detail(self) -> None:
        from .detail import DetailScreen

        key = self._selected_key()
        if key is not None:
            self.push_screen(DetailScreen(self.feed, key))

    def action_quit(self) -> None:  # type: ignore[override]
        self.exit(return_code=0)
