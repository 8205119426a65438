"""A mutation fuzzer of the queen's and the hive's HTTP APIs, as hypothesis strategies.

Each case starts from a valid request (a real heartbeat, a real worker spec, a real query) and
applies one to three mutations a hostile or broken client could send: a value anywhere in the JSON
tree replaced by a hostile one (control characters, ``/`` in ids, invalid UTF-8, huge or
non-finite numbers, deep nesting, a metrics map of thousands of keys, a megabyte string), a key
deleted or added, the worker list multiplied, the bytes flipped, cut or gzip-wrapped, a header
changed. ``run_case`` sends it over real HTTP and returns what came back, or why nothing did.
Used by ``tests/test_fuzz.py`` (CI-sized) and ``bench/test_bench_fuzz.py`` (the long run).
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
from hypothesis import strategies as st

from rbee.contract import encode

from .builders import fleet_heartbeat


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is: what ``json.dumps`` cannot write (invalid UTF-8, 1e999, NaN)."""

    text: bytes


@dataclass
class FuzzRequest:
    target: str
    """``queen`` or ``hive``."""
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def to_json(value: object) -> bytes:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b",".join(to_json(str(k)) + b":" + to_json(v)
                                for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    return json.dumps(value, allow_nan=True).encode()


HOSTILE = [
    "", " ", "a/b", "rack1/gpu-07", "../..", "a\nb", "gpu\r\nINFO forged log line",
    "\x1b[2J\x1b[31mred", "\x9b31m", "\u202eevil", "\x00", "é", "x" * 300, "x" * 5000,
    Raw(b'"gpu\xffhost"'), Raw(b'"\xc3\x28"'), Raw(b'"\\ud800"'), Raw(b"1e999"), Raw(b"-1e999"),
    Raw(b"NaN"), Raw(b"Infinity"), Raw(b"1" * 400), Raw(b"[" * 2000 + b"]" * 2000),
    Raw(b'{"a":' * 1500 + b"1" + b"}" * 1500), 1.7e308, -1, -1.5, 0, 2**63, 2**64, 2**22 + 1,
    True, None, [], {}, [1, "a", None], {"k": 1}, 1e-320, 99999999999999.9,
    {f"m{i}": i for i in range(5000)}, {"ok.metric": "text"}, {"x" * 100: 1.0},
    {"bad key": 1.0}, list(range(300)),
]


def seed_heartbeat() -> dict:
    """A valid heartbeat as JSON data: two workers on two GPUs, plugin metrics, an error."""
    data = json.loads(encode(fleet_heartbeat("fuzz-hive", 2)))
    data["capabilities"] = data["capabilities"][:2]
    data["timestamp"] = "2026-11-27T05:00:00.123456Z"  # fixed: the same seed gives the same case
    data["workers"][0]["metrics"] = {"plugin.queue": 3.0, "plugin.tokens_s": 120.5}
    data["workers"][0]["errors"] = [{"collector": "gpu", "message": "NVML: not supported"}]
    return data


SEED_SPEC = {"group": "fuzz", "instance": "w0", "argv": ["/nonexistent/rbee-fuzz-worker"],
             "cpu_limit": "50%", "memory_limit": "64M", "env": {"A": "1"},
             "restart": "never"}


def paths_of(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as the keys and indices leading to it."""
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths_of(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value[:3]):
            found += paths_of(inner, (*prefix, index))
    return found


def _parent(tree: object, path: tuple) -> object:
    for step in path[:-1]:
        tree = tree[step]
    return tree


_known_hostile = st.sampled_from(HOSTILE).map(copy.deepcopy)  # later mutations must not change it
hostile_values = st.one_of(
    _known_hostile, _known_hostile, _known_hostile, st.text(max_size=40), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
)


@st.composite
def mutated_tree(draw, seed: dict) -> object:
    tree = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(tree) if p]
        if not paths or not isinstance(tree, dict):
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(tree, path)
        kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add",
                                     "multiply"]))
        if kind == "replace":
            parent[path[-1]] = draw(hostile_values)
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["future", "x" * 200, "", "a\nb"]))] = draw(hostile_values)
        elif kind == "multiply" and isinstance(parent[path[-1]], list) and parent[path[-1]]:
            items = parent[path[-1]]
            parent[path[-1]] = items * draw(st.sampled_from([2, 50, 600, 1100, 3000]))
    return tree


@st.composite
def mutated_body(draw, seed: dict) -> tuple[bytes, dict[str, str]]:
    body = to_json(draw(mutated_tree(seed)))
    headers = {"content-type": "application/json"}
    damage = draw(st.sampled_from(["none", "none", "none", "flip", "cut", "insert", "gzip",
                                   "bad-gzip", "encoding"]))
    if damage == "flip" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
    elif damage == "cut":
        body = body[:draw(st.integers(0, len(body)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif damage == "gzip":
        body = gzip.compress(body, compresslevel=1)
        headers["content-encoding"] = "gzip"
    elif damage == "bad-gzip":
        body = gzip.compress(body)[:draw(st.integers(0, 40))]
        headers["content-encoding"] = "gzip"
    elif damage == "encoding":
        headers["content-encoding"] = draw(st.sampled_from(["br", "gzip, gzip", "x\x7f", ""]))
    return body, headers


def _segment(value: object) -> str:
    return quote(value if isinstance(value, str) else str(value), safe="")


@st.composite
def fuzz_requests(draw) -> FuzzRequest:
    """One hostile request to the queen or the hive; most are heartbeats."""
    kind = draw(st.sampled_from(["heartbeat"] * 6 + ["spawn"] * 2 + [
        "hive-path", "worker-path", "query"]))
    if kind == "heartbeat":
        body, headers = draw(mutated_body(seed_heartbeat()))
        return FuzzRequest("queen", "POST", "/v1/hive-heartbeat", body, headers)
    if kind == "spawn":
        body, headers = draw(mutated_body(SEED_SPEC))
        return FuzzRequest("hive", "POST", "/v1/workers", body, headers)
    text = st.one_of(st.sampled_from([h for h in HOSTILE if isinstance(h, str)]),
                     st.text(max_size=30))
    if kind == "hive-path":
        method = draw(st.sampled_from(["GET", "DELETE"]))
        return FuzzRequest("queen", method, f"/v1/hives/{_segment(draw(text))}")
    if kind == "worker-path":
        return FuzzRequest("hive", "DELETE",
                           f"/v1/workers/{_segment(draw(text))}/{_segment(draw(text))}")
    number = st.sampled_from(["inf", "-inf", "nan", "1e308", "1e999", "1e-300", "-0", "0",
                              "0x10", "1_000", " 5 ", "86400"])
    path, names = draw(st.sampled_from([
        ("/v1/workers", ["idle", "model", "min_free_vram_mb", "x"]),
        ("/v1/history", ["since", "step", "metric", "hive", "group", "instance", "gpu", "x"]),
        ("/metrics", ["x"])]))
    params = draw(st.dictionaries(st.sampled_from(names), st.one_of(text, number), max_size=3))
    query = "&".join(f"{_segment(k)}={_segment(v)}" for k, v in params.items())
    return FuzzRequest(draw(st.sampled_from(["queen", "hive"])) if path == "/metrics"
                       else "queen", "GET", f"{path}?{query}")


@dataclass
class Outcome:
    status: int | None = None
    problem: str = ""
    """Why the answer is wrong, or why none came."""


def run_case(clients: dict[str, httpx.Client], request: FuzzRequest) -> Outcome:
    """Send one case; an outcome with a problem is a finding: no answer, a 5xx, or an error
    that is not the JSON every client is promised."""
    client = clients[request.target]
    try:
        response = client.request(request.method, request.path, content=request.body or None,
                                  headers=request.headers)
    except httpx.HTTPError as exc:
        return Outcome(problem=f"no answer: {type(exc).__name__}: {exc}")
    if response.status_code >= 500:
        return Outcome(response.status_code, f"HTTP {response.status_code}: {response.text[:300]}")
    if response.status_code >= 400:
        try:
            reply = response.json()
        except ValueError:
            return Outcome(response.status_code, f"error not JSON: {response.text[:300]!r}")
        if reply.get("status") != "error" or not reply.get("message"):
            return Outcome(response.status_code, f"error without a message: {reply!r}")
    return Outcome(response.status_code)


def rss_mib(pid: int) -> float:
    """Resident memory of a process now, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def empty_path_env(directory: Path) -> dict[str, str]:
    """The environment of a hive under fuzz: a PATH with no programs, so no fuzzed spec can name
    a worker binary that exists (the seed's is absolute and absent)."""
    directory.mkdir(exist_ok=True)
    return {**os.environ, "PATH": str(directory)}
