"""What every test that runs the real playbook needs: this checkout exported for the role's
wheel build, Ansible's state kept in the test's tree, the vault encrypted by ``ansible-vault``,
and each host's counts read from the PLAY RECAP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .daemons import BIN

REPO = Path(__file__).parents[1]
SITE = REPO / "ansible" / "site.yml"
EXAMPLE_INVENTORY = REPO / "ansible" / "inventory" / "example"
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)


@dataclass
class Run:
    output: str
    changed: dict[str, int]
    """changed=N of each host in the PLAY RECAP."""

    @classmethod
    def parse(cls, output: str) -> Run:
        return cls(output, {host: int(changed) for host, _, changed, *_ in RECAP.findall(output)})


def export_checkout(destination: Path) -> Path:
    """This checkout's files as git sees them (tracked, and new files not ignored), so building
    its wheel writes nothing into the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def ansible_env(tree: Path) -> dict[str, str]:
    """Ansible's home, caches and temporary files in ``tree``, and plain text output."""
    return {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
            "ANSIBLE_HOME": str(tree / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(tree / "ansible-tmp"),
            "ANSIBLE_REMOTE_TEMP": str(tree / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}


def write_vault(tree: Path, inventory: Path, token: str) -> Path:
    """``group_vars/all/vault.yml`` holding the token, encrypted as the README says; returns
    the password file."""
    vault_password = tree / "vault-password"
    vault_password.write_text(os.urandom(16).hex())
    vault = inventory / "group_vars" / "all" / "vault.yml"
    vault.write_text(f"vault_rbee_auth_token: {token}\n")
    subprocess.run([str(BIN / "ansible-vault"), "encrypt", "--vault-password-file",
                    str(vault_password), str(vault)], check=True, capture_output=True,
                   env=ansible_env(tree), timeout=60)
    assert vault.read_text().startswith("$ANSIBLE_VAULT;") and token not in vault.read_text()
    return vault_password
