"""docs/configuration.md is generated from rbee/config.py (``./dev docs``): these fail while the
committed file is out of date, or while a key has no docstring to document it with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from rbee import config, docgen

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date():
    assert REFERENCE.read_text() == docgen.render(), (
        "docs/configuration.md is out of date with rbee/config.py: run ./dev docs")


@pytest.mark.parametrize("root", [config.HiveConfig, config.QueenConfig])
def test_every_key_has_a_docstring(root):
    """A key without a docstring would be a row that says nothing: write why it exists."""
    assert docgen.undocumented(root) == []


def test_every_key_is_in_the_reference_with_its_type_and_default():
    text = docgen.render()
    assert "| `registry.store.lease_s` | number >= 0.3, <= 60 | `1.5` |" in text
    assert "| `cgroup.backend` | \"auto\" or \"none\" or \"v1\" or \"v2\" | `\"auto\"` |" in text
    assert "| `workers[].group` | string of 1-128 matching" in text and "| required |" in text
    # a section's defaults are its parent's: the queen's http takes 4 MiB bodies, the hive's 64 KiB
    queen = text.split("## queen.yaml", 1)[1]
    assert "| `http.max_body_bytes` | integer >= 1024 | `4194304` (4 MiB) |" in queen
    assert "| `http.max_body_bytes` | integer >= 1024 | `65536` (64 KiB) |" in text.split(
        "## queen.yaml", 1)[0]
    # the host name is computed where the hive runs, never this machine's name written down
    assert config.HiveConfig().id not in text.split("| `bind`", 1)[0].split("| `id` |", 1)[1]
    for root in (config.HiveConfig, config.QueenConfig):
        for path, cls, _ in docgen._sections(root, ""):
            for field in msgspec.inspect.type_info(cls).fields:
                assert f"| `{path}{field.encode_name}` |" in text, f"{path}{field.name}"


def test_the_generator_notices_a_changed_docstring(tmp_path):
    """``--check`` is what fails after an edit of config.py without ./dev docs."""
    stale = tmp_path / "configuration.md"
    stale.write_text(docgen.render().replace("Largest request body accepted", "Largest body"))
    command = [sys.executable, "-m", "rbee.docgen", "--check", "--output", str(stale)]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "out of date: run ./dev docs" in failed.stderr
    subprocess.run([*command[:3], "--output", str(stale)], check=True, timeout=60)
    assert subprocess.run(command, timeout=60).returncode == 0
