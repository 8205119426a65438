"""The README and docs/ say what is true: the README stays short, every relative link resolves
(the file, and the heading an anchor names), the two commands CI and newcomers run are there, the
hive.yaml and the spawn body it shows work against a real ``rbee-hive``, and its sample output
has the columns the program prints, captured from a real ``rbee up``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import yaml

from rbee.config import HiveConfig, parse_config

from .conftest import RUN_ROOT
from .daemons import BIN, Daemon, end_process

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

LANDING_AT_MERGE: set[str] = set()
"""Pages linked before they are written (a branch in flight): a link to one is let pass only while
the page does not exist; once it lands, its links and anchors are checked like any other."""

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def text_of(page: Path) -> str:
    return page.read_text()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fenced = set(), False
    for line in text_of(page).splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_readme_is_short():
    lines = len(text_of(README).splitlines())
    assert lines <= 260, f"README.md has {lines} lines: move reference to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(text_of(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        name = str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            if name not in LANDING_AT_MERGE:
                broken.append(f"{target}: no file {name}")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {name}")
    assert not broken, broken


def test_readme_has_the_two_commands():
    """CI runs the README's test command (``.ci/run``); newcomers run the demo."""
    block = text_of(README).split("## Two commands", 1)[1].split("```sh\n", 1)[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["./dev up", "./dev test"]
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_docs_describe_the_program_not_its_changes(page):
    """Reference text says what is; how it got there belongs in the git history."""
    text = text_of(page)
    for narrative in ("main's queen", "before →", "→ now", "this branch", "is now a", "now measures"):
        assert narrative not in text, f"{page.name}: {narrative!r}"


def readme_hive_yaml() -> dict:
    block = text_of(README).split("# hive.yaml: a hive keeping one vLLM server running on GPU 0\n",
                                  1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def readme_spawn_body() -> dict:
    block = text_of(README).split("curl -X POST localhost:7835/v1/workers", 1)[1]
    return json.loads(block.split("-d '", 1)[1].split("'", 1)[0])


def test_readme_hive_yaml_is_a_valid_config():
    config = parse_config(readme_hive_yaml(), HiveConfig, "README.md")
    worker = config.workers[0]
    assert (config.id, worker.cpu_limit, worker.memory_limit) == ("gpu-07", "400%", "32G")
    assert worker.argv[:2] == ["vllm", "serve"] and "{port}" in worker.argv


def test_the_http_reference_shows_the_readmes_spawn_body():
    api = (ROOT / "docs" / "http-api.md").read_text()
    block = api.split("curl -X POST localhost:7835/v1/workers", 1)[1]
    assert json.loads(block.split("-d '", 1)[1].split("'", 1)[0]) == readme_spawn_body()


def test_readme_spawn_example_spawns_and_stops_a_worker(tmp_path):
    """The README's curl body, as written, against a real ``rbee-hive``. This machine has no vLLM:
    a ``vllm`` on the hive's PATH stands for it, running the demo worker, which serves vLLM's
    metrics on the ``{port}`` the hive picked; everything else is the product."""
    shim = tmp_path / "bin" / "vllm"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\n# vllm serve MODEL --port N, played by the demo worker\n'
                    f'exec {sys.executable} -m rbee.demo.worker --model "$2" --load 0.02 '
                    f'--metrics-port "$4"\n')
    shim.chmod(0o755)
    config = yaml.safe_dump({
        "id": "readme-hive", "port": 0, "queen_url": "http://127.0.0.1:9",
        "stop_workers_on_exit": True, "cgroup": {"root": f"{RUN_ROOT}/readme"},
        "collect": {"gpu": "none"}, "heartbeat": {"reminder_interval_s": 600}})
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    body = readme_spawn_body()
    name = f"{body['group']}/{body['instance']}"
    with Daemon("rbee-hive", tmp_path / "hive.yaml", config, env=env,
                cgroup_root=f"{RUN_ROOT}/readme") as hive, httpx.Client(timeout=10) as http:
        spawned = http.post(f"{hive.url}/v1/workers", json=body)
        assert spawned.status_code == 201, spawned.text
        assert spawned.json()["message"].startswith(f"spawned {name} (pid ")
        assert http.post(f"{hive.url}/v1/workers", json=body).status_code == 409
        deadline = time.monotonic() + 15
        while True:
            workers = {f"{w['group']}/{w['instance']}": w
                       for w in http.get(f"{hive.url}/v1/workers").json()}
            worker = workers.get(name)
            if worker and worker["model"] == "meta-llama/Llama-3.1-8B-Instruct" and (
                    worker.get("engine") or {}).get("engine") == "vllm":
                break
            assert time.monotonic() < deadline, json.dumps(workers)
            time.sleep(0.1)
        assert worker.get("state", "running") in ("starting", "running")  # omitted: running
        stopped = http.delete(f"{hive.url}/v1/workers/{name}")
        assert stopped.json() == {"status": "ok", "message": f"stopped {name}"}
        listed = [f"{w['group']}/{w['instance']}" for w in http.get(f"{hive.url}/v1/workers").json()]
        assert name not in listed
        gone = http.delete(f"{hive.url}/v1/workers/{name}")
        assert gone.status_code == 404 and gone.json()["status"] == "error", gone.text


def sample_block(after: str) -> list[str]:
    """The lines of the README's first code block after the text ``after``."""
    text = text_of(README).split(after, 1)[1]
    return text.split("```\n", 1)[1].split("```", 1)[0].splitlines()


def test_readme_sample_output_matches_the_program(tmp_path):
    """``rbee up`` and ``rbee workers`` for real: the README's samples have the program's first
    lines and exactly its table header, and its history example names the demo's hive and
    answers series for it."""
    up = subprocess.Popen([str(BIN / "rbee"), "up", "--port", "0", "--rounds", "200"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = up.stdout.readline()
        queen = re.search(r"queen (http://\S+),", first)[1]
        seen = [first]
        while sum("schedulable:" in line for line in seen) < 3:
            line = up.stdout.readline()
            assert line, seen
            seen.append(line)
        header = next(line for line in seen if line.startswith("HIVE "))
        workers = subprocess.run([str(BIN / "rbee"), "workers", "--queen", queen],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        idle = subprocess.run([str(BIN / "rbee"), "workers", "--queen", queen, "--idle"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        example = text_of(README).split("curl 'localhost:7833/v1/history?", 1)[1].split("'")[0]
        history = httpx.get(f"{queen}/v1/history?{example}", timeout=10).json()
    finally:
        end_process(up, signal.SIGINT, timeout=20)
        up.stdout.close()

    demo = sample_block("It prints the fleet as the queen streams it")
    generic = re.compile(r"http://127\.0\.0\.1:\d+")
    assert generic.sub("URL", demo[0]).replace("v2", "v1") == generic.sub(
        "URL", first.rstrip()).replace("v2", "v1")
    assert demo[4] == header.rstrip()
    assert [line.split()[:2] for line in demo[5:]] == [
        ["demo-hive", "embed/bge-0"], ["demo-hive", "llm/llama-0"], ["demo-hive", "llm/llama-1"]]

    listing = sample_block("against\nthe demo:")
    assert listing[0] == "$ rbee workers" and listing[1] == workers.splitlines()[0].rstrip()
    assert listing[5] == workers.splitlines()[-1] == "3 workers"
    at = listing.index("$ rbee workers --idle")
    assert listing[at + 1] == idle.splitlines()[0].rstrip()
    assert re.fullmatch(r"\d+ workers?", listing[at + 2]) and re.fullmatch(
        r"\d+ workers?", idle.splitlines()[-1])

    assert "hive=demo-hive" in example
    assert {s["hive"] for s in history["series"]} == {"demo-hive"}, history
    assert {s["metric"] for s in history["series"]} == {"cpu_pct", "rss_mb"}


@pytest.mark.parametrize("text", ["colect: {}\n",
                                  "workers: [{group: llm, instance: a, argv: [x], cpu_limit: 2}]\n"])
def test_readme_config_errors_are_the_programs(tmp_path, text):
    """The README's two config mistakes, as ``rbee-hive --check-config`` says them."""
    (tmp_path / "hive.yaml").write_text(text)
    checked = subprocess.run([str(BIN / "rbee-hive"), "--config", "hive.yaml", "--check-config"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert checked.returncode == 2
    shown = sample_block("with what to write instead:")
    assert shown[0] == "$ rbee-hive --config hive.yaml --check-config"
    assert checked.stderr.strip() in shown[1:]


ROUTE = re.compile(r'Route\(paths\.(\w+), \w+\.\w+, methods=\["(\w+)"\]\)')


@pytest.mark.parametrize("server", ["queen", "hive"])
def test_the_http_reference_has_every_route_once(server):
    """Each route the server's app registers (``rbee/<server>/api.py``), and ``GET /metrics``,
    has its one row in the server's table of docs/http-api.md."""
    from rbee.contract import paths

    source = (ROOT / "rbee" / server / "api.py").read_text()
    routes = [f"{method} {getattr(paths, name)}" for name, method in ROUTE.findall(source)]
    assert "metrics_route(" in source
    routes.append(f"GET {paths.METRICS}")
    api = (ROOT / "docs" / "http-api.md").read_text()
    table = api.split(f"## The {server}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()
            if line.startswith("| `")]
    rows = [row for row in rows if not row.startswith(("idle", "model", "min_", "max_", "limit",
                                                       "after"))]
    for route in routes:
        assert rows.count(route) == 1, (route, rows)


def test_the_readmes_command_line_options_exist():
    """Every option the README's synopsis gives a command is one its ``--help`` lists."""
    block = text_of(README).split("## The command line\n", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    commands: dict[tuple[str, ...], set[str]] = {}
    current: tuple[str, ...] = ()
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if words and not words[0].startswith("["):
            current = tuple(w for w in words[:3] if re.fullmatch(r"[a-z][a-z-]*", w))
        commands.setdefault(current, set()).update(re.findall(r"--[a-z-]+", line.split("#")[0]))
    assert ("rbee", "workers") in commands and ("rbee-hive",) in commands
    for command, options in commands.items():
        shown = subprocess.run([str(BIN / command[0]), *command[1:], "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
        missing = [option for option in options if option not in shown]
        assert not missing, (command, missing)
