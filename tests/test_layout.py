"""The house's rules, checked on the source (issue 23): no import cycle between rbee's modules,
type-only imports included; no product module over 450 lines; the built-in collectors use only
the public plugin API and the contract, never the hive's internals; the CLI imports nothing from
the queen; layers point down (the contract and the HTTP layer know neither hive nor queen)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Every product module by its installed name (``collectors/`` is ``rbee.collectors``)."""
    found = {}
    for base, package in ((ROOT / "rbee", "rbee"), (ROOT / "collectors", "rbee.collectors")):
        for path in base.rglob("*.py"):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The rbee modules ``name`` imports, anywhere in it (``if TYPE_CHECKING:`` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_no_import_cycle():
    """Tarjan's strongly connected components: any component of more than one module is a
    cycle. A package importing its own submodules (``__init__`` re-exports) is not one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def edges(name: str) -> set[str]:
        return {t for t in GRAPH[name] if not t.startswith(name + ".")}

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in edges(name):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_450_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines"


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("rbee.collectors", "rbee.hive"),   # built-ins use the plugin API a third party has
    ("rbee.cli", "rbee.queen"),
    ("rbee.contract", "rbee.hive"), ("rbee.contract", "rbee.queen"), ("rbee.contract", "rbee.http"),
    ("rbee.http", "rbee.hive"), ("rbee.http", "rbee.queen"),
    ("rbee.config", "rbee.hive"), ("rbee.config", "rbee.queen"),
    ("rbee.plugin", "rbee.hive"),
])
def test_layers_point_down(importer, forbidden):
    wrong = sorted(f"{name} -> {target}" for name, targets in GRAPH.items()
                   if name == importer or name.startswith(importer + ".")
                   for target in targets if target == forbidden or target.startswith(forbidden + "."))
    assert wrong == []


def test_no_isinstance_on_a_cgroup_backend():
    """What the none backend answers differently is a method of the backend interface."""
    backends = {"NoCgroup", "CgroupV1", "CgroupV2", "CgroupBackend"}
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "isinstance" and len(node.args) == 2):
                kinds = node.args[1]
                names = {n.id for n in ast.walk(kinds) if isinstance(n, ast.Name)}
                if names & backends:
                    found.append(f"{name}:{node.lineno}")
    assert found == []


def test_every_source_folder_is_a_package_the_wheel_ships():
    """setup.py ships what ``find_packages`` finds: a folder of modules without ``__init__.py``
    would be left out of the wheel (and so of every host Ansible installs)."""
    folders = {path.parent for top in ("rbee", "collectors") for path in (ROOT / top).rglob("*.py")}
    assert [str(folder.relative_to(ROOT)) for folder in sorted(folders)
            if not (folder / "__init__.py").exists()] == []
