"""``rbee top`` in a real terminal (tmux at 100x30 and 200x50) against a real queen fed by three
hives' heartbeats over HTTP: the table fits (no row wraps), sorts, filters, opens a worker's
detail with its history and goes back, shows plugin columns on request, says clearly when the
queen cannot be reached, and ``q`` ends the process with status 0."""

from __future__ import annotations

import re
import subprocess

import httpx
import trio

from rbee.contract import EngineState

from .builders import gpu, heartbeat, worker
from .daemons import BIN
from .queenkit import post_heartbeat, start_queen, url_of
from .tmuxkit import terminal

GIB = 1024


def fleet() -> list:
    """Three hives: a saturated GPU worker with a plugin figure, two quieter ones, a CPU one."""
    return [
        heartbeat("gpu-a", [
            worker("chat", model="qwen-7b", gpu_util_pct=97.0, gpu_indices=[0],
                   vram_mb=70 * GIB, total_vram_mb=80 * GIB, metrics={"ctxsw.procs": 7.0},
                   endpoint="http://10.0.0.7:8000",
                   engine=EngineState(engine="vllm", requests_running=8, requests_waiting=12,
                                      kv_cache_pct=96.0)),
            worker("embed", model="bge-m3", gpu_util_pct=10.0, gpu_indices=[1],
                   vram_mb=4 * GIB, total_vram_mb=80 * GIB,
                   engine=EngineState(engine="vllm", requests_running=0, requests_waiting=0,
                                      kv_cache_pct=5.0))],
            [gpu(0, total_gib=80, used_gib=70, util_pct=97.0),
             gpu(1, total_gib=80, used_gib=4, util_pct=10.0)]),
        heartbeat("gpu-b", [worker("batch", model="llama-70b", gpu_util_pct=55.0,
                                   gpu_indices=[0], vram_mb=40 * GIB, total_vram_mb=80 * GIB)],
                  [gpu(0, total_gib=80, used_gib=40, util_pct=55.0)]),
        heartbeat("cpu-c", [worker("tiny", model="phi-3", gpu_util_pct=None)]),
    ]


async def keep_beating(queen, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The three hives, every 0.5 s (so none goes stale while the test runs)."""
    async with httpx.AsyncClient() as client:
        for beat in fleet():
            await post_heartbeat(client, queen, beat)
        task_status.started()
        while True:
            await trio.sleep(0.5)
            for beat in fleet():
                await post_heartbeat(client, queen, beat)


def row_of(lines: list[str], instance: str) -> str:
    (line,) = [line for line in lines if f"llm/{instance}" in line]
    return line


def sort_label(lines: list[str]) -> str | None:
    found = re.search(r"sort: (\S+ [v^])", "\n".join(lines))
    return found.group(1) if found else None


def shows_fleet(lines: list[str]) -> bool:
    return all(any(f"llm/{w}" in line for line in lines) for w in ("chat", "embed", "batch", "tiny"))


async def test_top_fits_sorts_filters_opens_a_worker_and_quits(nursery):
    queen = await start_queen(nursery)
    await nursery.start(keep_beating, queen)
    async with terminal([str(BIN / "rbee"), "top", "--queen", url_of(queen)], 100, 30) as term:
        lines = await term.until(lambda s: shows_fleet(s) and "schedulable" in "\n".join(s),
                                 what="the four workers and the queen's summary")
        assert all(len(line) <= 100 for line in lines)
        header = next(line for line in lines if "HIVE" in line)
        for title in ("HIVE", "GROUP/INSTANCE", "MODEL", "GPU%", "KV%"):
            assert f" {title} " in f" {header} "  # whole titles: none cut by the width
        assert "PID" not in header  # the lowest priority goes first on a narrow terminal
        chat = row_of(lines, "chat")  # one line per worker: its hive and model on it, no wrap
        assert chat.split()[0] == "gpu-a" and "qwen-7b" in chat and "97" in chat
        assert "3 hives (0 stale), 4 workers" in "\n".join(lines)

        label = None
        for _ in range(12):  # s: the next sort column, until GPU% (largest first)
            term.keys("s")
            lines = await term.until(lambda s: sort_label(s) != label, what="a new sort")
            if (label := sort_label(lines)) == "GPU% v":
                break
        lines = await term.until(lambda s: sort_label(s) == "GPU% v" and shows_fleet(s))
        order = [next(w for w in ("chat", "embed", "batch", "tiny") if f"llm/{w}" in line)
                 for line in lines if "llm/" in line]
        assert order == ["chat", "batch", "embed", "tiny"]  # 97, 55, 10, then none (CPU)

        term.keys("/")
        await term.until(lambda s: any("filter: hive, worker or model" in line for line in s),
                         what="the filter box")
        term.keys("qwen", literal=True)  # a q typed in the filter is text, not quit
        term.keys("Enter")
        lines = await term.until(lambda s: "filter: qwen" in "\n".join(s)
                                 and "1 of 4 workers" in "\n".join(s)
                                 and [w for w in ("chat", "embed", "batch", "tiny")
                                      if any(f"llm/{w}" in line for line in s)] == ["chat"],
                                 what="only the qwen worker, and the header saying so")
        assert "qwen-7b" in row_of(lines, "chat")

        term.keys("Enter")  # the detail of the worker under the cursor
        # its last line, the KV cache sparkline, on screen: tmux may show a frame half drawn
        lines = await term.until(lambda s: any("gpu-a/llm/chat" in line for line in s)
                                 and any(line.startswith("KV cache %") for line in s),
                                 what="the detail view")
        assert any("last 5 minutes" in line for line in lines)
        assert any(line.startswith("GPU %") for line in lines)
        assert any("ctxsw.procs=7" in line for line in lines)  # its plugin figures
        assert any("endpoint: http://10.0.0.7:8000" in line for line in lines)
        assert any("12 waiting" in line or "QUEUE: 12" in line for line in lines)
        await term.until(lambda s: any(line.startswith("GPU %") and "█" in line for line in s),
                         what="a GPU % sparkline (97 % of 100)")
        term.keys("s")  # the table's keys do nothing here
        term.keys("Escape")
        lines = await term.until(lambda s: "filter: qwen" in "\n".join(s)
                                 and any("llm/chat" in line and "qwen-7b" in line for line in s),
                                 what="the table again")
        assert sort_label(lines) == "GPU% v"
        term.keys("Escape")  # clears the filter
        await term.until(shows_fleet, what="every worker again")
        term.keys("q")
        assert await term.exit_status() == 0


async def test_top_on_a_wide_terminal_shows_plugin_columns_bars_and_notes(nursery):
    queen = await start_queen(nursery)
    await nursery.start(keep_beating, queen)
    argv = [str(BIN / "rbee"), "top", "--queen", url_of(queen), "--columns", "ctxsw.procs"]
    async with terminal(argv, 200, 50) as term:
        lines = await term.until(lambda s: shows_fleet(s) and any("ctxsw.procs" in line for line in s)
                                 and any("gpu-b" in line and "GPU 0" in line for line in s),
                                 what="the four workers, the plugin column and the GPUs")
        assert all(len(line) <= 200 for line in lines)
        header = next(line for line in lines if "HIVE" in line)
        for title in ("ctxsw.procs", "NOTE", "QUEUE", "VRAM MB", "RUN", "CPU%"):
            assert title in header
        at = header.index("ctxsw.procs")
        assert row_of(lines, "chat")[at:at + 12].split() == ["7"]
        assert row_of(lines, "embed")[at:at + 12].split() == ["-"]  # no such figure: not 0
        assert "█" in row_of(lines, "chat")  # the GPU, VRAM and KV bars
        assert any("gpu-b" in line and "GPU 0" in line for line in lines)  # the GPUs below
        term.keys("C-c")  # Ctrl-C ends it as q does
        assert await term.exit_status() == 0


async def test_top_says_when_the_queen_cannot_be_reached_and_quits():
    async with terminal([str(BIN / "rbee"), "top", "--queen", "http://127.0.0.1:9"],
                        100, 30) as term:
        await term.until(lambda s: any("cannot reach the queen at http://127.0.0.1:9" in line
                                       and "retrying" in line for line in s))
        term.keys("q")
        assert await term.exit_status() == 0


async def test_top_plain_fits_the_terminal(nursery):
    """``--plain`` (text, no keys) on a 100-column terminal: every line, rejoined where the
    terminal wrapped it, is 100 characters at most."""
    queen = await start_queen(nursery)
    await nursery.start(keep_beating, queen)
    async with terminal([str(BIN / "rbee"), "top", "--plain", "--queen", url_of(queen)],
                        100, 30) as term:
        lines = await term.until(shows_fleet, what="the four workers")
        joined = term.tmux("capture-pane", "-p", "-J", "-t", "top").splitlines()
        assert max(len(line.rstrip()) for line in joined) <= 100
        assert "PID" not in next(line for line in lines if "HIVE" in line)


def test_top_rounds_says_when_the_queen_cannot_be_reached():
    """Text mode (``--rounds``): the fleet header with the reason, then the end, status 0."""
    result = subprocess.run([str(BIN / "rbee"), "top", "--rounds", "1", "--queen",
                             "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == ("rbee: queen http://127.0.0.1:9  [cannot reach the queen at "
                     "http://127.0.0.1:9: ConnectError; retrying]")


async def test_rbee_workers_fits_the_terminal(nursery):
    """On a 100-column terminal ``rbee workers`` drops columns as ``rbee top`` does (all its
    output, scrollback included, rejoined where the terminal wrapped a line)."""
    queen = await start_queen(nursery)
    await nursery.start(keep_beating, queen)
    async with terminal([str(BIN / "rbee"), "workers", "--queen", url_of(queen)], 100, 30) as term:
        assert await term.exit_status() == 0
        shown = term.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "top").splitlines()
    output = shown[:shown.index("4 workers") + 1]
    assert max(len(line.rstrip()) for line in output) <= 100
    assert output[0].startswith("HIVE") and "PID" not in output[0] and shows_fleet(output)
