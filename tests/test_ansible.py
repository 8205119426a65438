"""The Ansible rollout, for real: ``ansible-lint`` (production profile) on ``ansible/``, and the
site playbook run against this machine with a local connection.

The playbook installs this checkout (built into a wheel, as ``rbee_install_source: checkout``
does) into a virtualenv, creates a real system user, renders configs, token files and systemd
units, all under a temporary prefix, with Ansible's own state (``ANSIBLE_HOME``, temp dirs) in
the same temporary tree. The token comes from an inventory vault file encrypted by
``ansible-vault``, as in the README.

What cannot be real here, and what stands in for it: this machine does not run systemd, so the
roles run with ``rbee_*_service_manage: false`` and the test starts each service exactly as its
unit's ``ExecStart`` says (under the unit's ``NoNewPrivileges`` and ``MemoryDenyWriteExecute``,
set through prctl), plays a ``KillMode=process`` restart by hand, and checks the units with
``systemd-analyze verify``. The services run as root, not as the unit's ``User=``: this
interpreter lives under /root/.pyenv, which no other user may read. The hive runs as root anyway
on this cgroup v1 host (the role refuses an unprivileged hive without cgroup v2).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio
import trustme
import yaml

from rbee.credentials import HiveCredentials

from .ansiblekit import EXAMPLE_INVENTORY, REPO, SITE, Run, ansible_env, export_checkout, write_vault
from .conftest import IS_ROOT, RUN_ROOT
from .daemons import BIN, Daemon, clear_cgroup_root
from .queenkit import free_port

pytestmark = pytest.mark.skipif(
    not IS_ROOT, reason="the playbook creates a system user and chowns files: that needs root")

HEARTBEAT_INTERVAL_S = 1.0  # hive.yaml's default, which the deployment keeps


@dataclass
class Deployment:
    tree: Path
    prefix: Path
    inventory: Path
    vault_password: Path
    env: dict[str, str]
    token: str
    user: str
    queen_port: int
    hive_vars: dict
    cgroup_root: str
    runs: list[Run]
    tls: dict[str, str]
    """PEM text: the test's CA, the certificate (for 127.0.0.1) and its key."""

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.tls["ca"])

    def path(self, relative: str) -> Path:
        return self.prefix / relative

    def run_playbook(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory),
             "--vault-password-file", str(self.vault_password), str(SITE), *args],
            env=self.env, capture_output=True, text=True, timeout=600)

    def playbook(self, *args: str) -> Run:
        """A run that must succeed, with its output and each host's changed count."""
        result = self.run_playbook(*args)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        run = Run.parse(result.stdout)
        assert set(run.changed) == {"queen-local", "hive-local"}, result.stdout[-3000:]
        self.runs.append(run)
        return run


def write_inventory(tree: Path, prefix: Path, *, user: str, queen_port: int, hive_port: int,
                    hive_vars: dict, token: str, tls: dict[str, str]) -> tuple[Path, Path]:
    """The inventory: this machine as the queen and as a hive, the example's group_vars/all
    (token from the vault), the test's overrides, and a vault encrypted by ansible-vault."""
    inventory = tree / "inventory"
    shutil.copytree(EXAMPLE_INVENTORY / "group_vars" / "all", inventory / "group_vars" / "all")
    local = {"ansible_host": "127.0.0.1", "ansible_connection": "local",
             "ansible_python_interpreter": sys.executable,  # discovery picks a pyenv shim here
             "ansible_become": False}  # already root, and sudo is not installed
    hosts = {"rbee_queens": {"hosts": {"queen-local": {**local, "rbee_queen_port": queen_port}}},
             "rbee_hives": {"hosts": {"hive-local": {**local, "rbee_hive_port": hive_port}}}}
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    venv = prefix / "opt/rbee/venv"
    overrides = {
        "rbee_install_source": "checkout",
        "rbee_install_checkout": str(export_checkout(tree / "checkout")),
        "rbee_install_build_dir": str(tree / "wheels"),
        "rbee_install_python": sys.executable,
        "rbee_install_dist_dir": str(prefix / "opt/rbee/dist"),
        **{f"rbee_{role}_{name}": str(prefix / path) for role in ("queen", "hive")
           for name, path in (("venv_dir", "opt/rbee/venv"), ("config_dir", "etc/rbee"),
                              ("unit_dir", "etc/systemd/system"))},
        "rbee_hive_log_dir": str(prefix / "var/log/rbee"),
        "rbee_queen_service_manage": False,
        "rbee_hive_service_manage": False,
        "rbee_queen_user": user,
        "rbee_hive_user": "root",
        "rbee_queen_bind": "127.0.0.1",  # the role binds 0.0.0.0 by default; tests stay on loopback
        "rbee_queen_prometheus_file_sd": str(prefix / "etc/prometheus/rbee-targets.json"),
        # HTTPS between hive and queen, and for the hive's API (a real fleet keeps keys in the vault)
        "rbee_queen_tls_cert": tls["cert"], "rbee_queen_tls_key": tls["key"],
        "rbee_hive_queen_ca": tls["ca"],
        "rbee_hive_tls_cert": tls["cert"], "rbee_hive_tls_key": tls["key"],
        **hive_vars,
        "rbee_hive_workers": [{"group": "demo", "instance": "a", "argv": [
            str(venv / "bin/python"), "-m", "rbee.demo.worker", "--model", "ansible-demo",
            "--load", "0.05"]}],
    }
    (inventory / "group_vars" / "all" / "zz-test.yml").write_text(yaml.safe_dump(overrides))
    vault_password = write_vault(tree, inventory, token)
    return inventory, vault_password


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, timeout=30)
    subprocess.run(["groupdel", name], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    """A check run on the new host, then the real run."""
    tree = tmp_path_factory.mktemp("ansible")
    prefix = tree / "root"
    (prefix / "etc/systemd/system").mkdir(parents=True)  # there on every systemd host
    (prefix / "etc/prometheus").mkdir(parents=True)  # and on a Prometheus host
    user = f"rbee-t{os.getpid()}"
    cgroup_root = f"{RUN_ROOT}/ansible"
    hive_vars = {"rbee_hive_config": {"cgroup": {"root": cgroup_root},
                                      "collect": {"gpu": "none"}}}
    token = os.urandom(24).hex()
    queen_port, hive_port = free_port(), free_port()
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    tls = {"ca": ca.cert_pem.bytes().decode(),
           "cert": "".join(pem.bytes().decode() for pem in issued.cert_chain_pems),
           "key": issued.private_key_pem.bytes().decode()}
    try:
        inventory, vault_password = write_inventory(
            tree, prefix, user=user, queen_port=queen_port, hive_port=hive_port,
            hive_vars=hive_vars, token=token, tls=tls)
        deployment = Deployment(tree, prefix, inventory, vault_password, ansible_env(tree),
                                token, user, queen_port, hive_vars, cgroup_root, [], tls)
        deployment.playbook("--check", "--diff")
        deployment.playbook()
        # Later runs install the wheel the real run built, as rbee_install_source: wheel does
        # (as in the fleet test): the same file and version, so nothing changes, and no run
        # spends its 12 s rebuilding the extension.
        (wheel,) = (tree / "wheels").glob("rbee_telemetry-*.whl")
        (inventory / "group_vars" / "all" / "zzz-built-wheel.yml").write_text(yaml.safe_dump(
            {"rbee_install_source": "wheel", "rbee_install_wheel": str(wheel)}))
        yield deployment
    finally:
        remove_user(user)
        clear_cgroup_root(cgroup_root)


def test_ansible_lint_production_profile(tmp_path):
    """On a copy, so that the linter's caches land in the temporary tree."""
    shutil.copytree(REPO / "ansible", tmp_path / "ansible")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "ANSIBLE_HOME": str(tmp_path / "ansible-home"), "NO_COLOR": "1"}
    result = subprocess.run([str(BIN / "ansible-lint"), "--profile", "production"],
                            cwd=tmp_path / "ansible", env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr + result.stdout


def test_example_inventory_names_a_queen_and_hives(tmp_path):
    result = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE_INVENTORY),
                             "--list"], env=ansible_env(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)
    assert groups["rbee_queens"]["hosts"] == ["queen-01"]
    assert len(groups["rbee_hives"]["hosts"]) >= 2


def test_hives_get_every_queen_of_the_group(tmp_path):
    """With several hosts in rbee_queens, each hive's config lists them all (an IPv6 address
    bracketed, each queen's own port); an explicit rbee_hive_queen_url still wins."""
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({
        "rbee_queens": {"hosts": {"q1": {"ansible_host": "10.0.0.10"},
                                  "q2": {"ansible_host": "fd00::2", "rbee_queen_port": 7900}}},
        "rbee_hives": {"hosts": {"h1": {"ansible_connection": "local",
                                        "ansible_python_interpreter": sys.executable}}}}))
    role = REPO / "ansible/roles/rbee_hive"
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "rbee_hives", "gather_facts": False,
        "vars_files": [str(role / "defaults/main.yml"), str(role / "vars/main.yml")],
        "tasks": [{"ansible.builtin.debug": {"msg": "{{ _rbee_hive_config.queen_url | to_json }}"}}],
    }]))
    said = []
    for extra in ({}, {"rbee_hive_queen_url": "http://queen.example:7833"}):
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
             str(tmp_path / "play.yml"), "-e", json.dumps(extra)],
            env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        said.append(json.loads(json.loads(result.stdout.split('"msg": ', 1)[1].split("\n", 1)[0])))
    assert said == [["http://10.0.0.10:7833", "http://[fd00::2]:7900"],
                    "http://queen.example:7833"]


def test_check_mode_on_a_new_host_writes_nothing(deployment):
    check, real = deployment.runs[:2]
    assert check.changed["queen-local"] > 0 and check.changed["hive-local"] > 0
    assert "+auth_token_file: " in check.output  # the diff of the configs is shown
    assert real.changed["queen-local"] > 0
    secret = (deployment.inventory / "credentials" / "hive-local").read_text().strip()
    for run in deployment.runs:  # the token and the hive's secret never show, even in a diff
        assert deployment.token not in run.output and secret not in run.output


def test_configs_pass_the_commands_own_check(deployment):
    venv_bin = deployment.path("opt/rbee/venv/bin")
    queen_yaml, hive_yaml = deployment.path("etc/rbee/queen.yaml"), deployment.path(
        "etc/rbee/hive.yaml")
    for command, config in (("rbee-queen", queen_yaml), ("rbee-hive", hive_yaml)):
        result = subprocess.run([str(venv_bin / command), "--check-config", "--config",
                                 str(config)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    # the hive's queen URL comes from the inventory's queen entry; with the CA given, https
    queen_url = f"https://127.0.0.1:{deployment.queen_port}"
    assert f"queen {queen_url} (with its credential)" in result.stdout
    queen = yaml.safe_load(queen_yaml.read_text())
    assert (queen["bind"], queen["port"]) == ("127.0.0.1", deployment.queen_port)
    hive = yaml.safe_load(hive_yaml.read_text())
    assert hive["queen_url"] == queen_url and hive["id"] == "hive-local"
    assert hive["cgroup"] == deployment.hive_vars["rbee_hive_config"]["cgroup"]

    queen_group = grp.getgrnam(deployment.user).gr_gid
    assert pwd.getpwnam(deployment.user).pw_shell == "/usr/sbin/nologin"
    for path, gid in ((queen["auth_token_file"], queen_group), (hive["auth_token_file"], 0),
                      (queen_yaml, queen_group), (queen["hive_credentials_file"], queen_group),
                      (hive["credential_file"], 0)):
        stat = os.stat(path)
        assert (oct(stat.st_mode & 0o777), stat.st_uid, stat.st_gid) == ("0o640", 0, gid), path
    assert Path(queen["auth_token_file"]).read_text() == deployment.token + "\n"
    # TLS: the files the configs name, the keys readable by the service's group only
    assert Path(queen["http"]["tls_key_file"]).read_text() == deployment.tls["key"]
    assert Path(hive["queen_ca_file"]).read_text() == deployment.tls["ca"]
    for path in (queen["http"]["tls_key_file"], hive["http"]["tls_key_file"]):
        assert oct(os.stat(path).st_mode & 0o777) == "0o640", path
    for path in (queen["http"]["tls_cert_file"], hive["queen_ca_file"]):
        assert oct(os.stat(path).st_mode & 0o777) == "0o644", path
    # the hive's own secret, generated on the controller, and its hash on the queen
    secret = Path(hive["credential_file"]).read_text().strip()
    assert secret == (deployment.inventory / "credentials" / "hive-local").read_text().strip()
    assert len(secret) >= 43 and secret not in Path(queen["hive_credentials_file"]).read_text()
    credentials = HiveCredentials(queen["hive_credentials_file"])
    assert len(credentials) == 1 and credentials.verify("hive-local", secret)
    # Prometheus file_sd targets: the queen and the hive, each at its /metrics port
    targets = json.loads(deployment.path("etc/prometheus/rbee-targets.json").read_text())
    assert targets == [
        {"targets": [f"127.0.0.1:{deployment.queen_port}"], "labels": {"rbee_role": "queen"}},
        {"targets": [f"127.0.0.1:{hive['port']}"], "labels": {"rbee_role": "hive"}}]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_units_pass_systemd_analyze_verify(deployment):
    units = [deployment.path(f"etc/systemd/system/rbee-{name}.service")
             for name in ("queen", "hive")]
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    hive_unit = units[1].read_text()
    assert "\nDelegate=yes\n" in hive_unit and "\nKillMode=process\n" in hive_unit
    # descriptors for http.max_connections (the defaults: 4,000 and 1,000) and 1,024 to spare
    assert "\nLimitNOFILE=5024\n" in units[0].read_text()
    assert "\nLimitNOFILE=2024\n" in hive_unit
    assert "\nProtectControlGroups" not in hive_unit  # the hive writes its cgroup subtree
    assert "\nProtectSystem=strict\n" in units[0].read_text()


# Applies the unit's NoNewPrivileges= and MemoryDenyWriteExecute= through the kernel's own
# switches (prctl PR_SET_NO_NEW_PRIVS, PR_SET_MDWE; both survive exec), then execs the command:
# proof that the service works under that hardening, without systemd.
SANDBOX = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for option, wanted in ((38, "NoNewPrivileges=yes"), (65, "MemoryDenyWriteExecute=yes")):
    if wanted in sys.argv[1].splitlines() and libc.prctl(option, 1, 0, 0, 0) != 0:
        sys.exit(f"prctl({option}) for {wanted}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[2], sys.argv[2:])
"""


def exec_start(unit: Path) -> list[str]:
    """The unit's ExecStart, run under the sandbox settings of the unit that the kernel offers."""
    text = unit.read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return [sys.executable, "-c", SANDBOX, text, *shlex.split(line.removeprefix("ExecStart="))]


async def test_services_run_as_their_units_say(deployment, tmp_path):
    """Queen and hive started from the units' ExecStart: the queen lists the hive's worker
    within two heartbeat intervals of the hive starting. Then a restart as systemd does it with
    KillMode=process (SIGTERM to the hive alone): the worker runs on, the queen lists it all
    along, and the new hive re-adopts it."""
    units = deployment.path("etc/systemd/system")
    queen_url = f"https://127.0.0.1:{deployment.queen_port}"
    hive_argv = exec_start(units / "rbee-hive.service")
    async with httpx.AsyncClient(base_url=queen_url, timeout=5,
                                 verify=deployment.verify()) as client:

        async def listed_pids() -> list[int]:
            return [w["worker"]["pid"] for w in (await client.get("/v1/workers")).json()]

        with Daemon.from_argv(exec_start(units / "rbee-queen.service"),
                              tmp_path / "queen.stderr"):
            with Daemon.from_argv(hive_argv, tmp_path / "hive.stderr",
                                  cgroup_root=deployment.cgroup_root) as hive:
                with trio.fail_after(2 * HEARTBEAT_INTERVAL_S):
                    while not (pids := await listed_pids()):
                        await trio.sleep(0.02)
                hive.cgroup_root = None  # its worker must outlive it
            assert hive.process.returncode == 0
            os.kill(pids[0], 0)  # still running
            assert await listed_pids() == pids
            restarted_at = datetime.now(UTC)
            with Daemon.from_argv(hive_argv, tmp_path / "hive-2.stderr",
                                  cgroup_root=deployment.cgroup_root) as restarted:
                with trio.fail_after(2 * HEARTBEAT_INTERVAL_S):
                    while datetime.fromisoformat((await client.get("/v1/hives/hive-local")
                                                  ).json()["last_heartbeat"]) < restarted_at:
                        await trio.sleep(0.02)
                assert await listed_pids() == pids
                assert "re-adopted worker demo/a" in restarted.stderr()
        log = deployment.path("var/log/rbee/demo-a.log")
        assert log.exists()


def test_second_run_changes_nothing_and_a_change_restarts(deployment):
    second = deployment.playbook()
    assert second.changed == {"queen-local": 0, "hive-local": 0}, second.output[-3000:]

    hive_yaml = deployment.path("etc/rbee/hive.yaml")
    before = hive_yaml.read_text()
    changed_config = json.loads(json.dumps(deployment.hive_vars["rbee_hive_config"]))
    changed_config["heartbeat"] = {"interval_s": 2.0}
    preview = deployment.playbook("--check", "--diff", "-e",
                                  json.dumps({"rbee_hive_config": changed_config}))
    assert preview.changed["queen-local"] == 0 and preview.changed["hive-local"] > 0
    assert "+  interval_s: 2.0" in preview.output
    assert "RUNNING HANDLER [rbee_hive : Restart rbee-hive]" in preview.output
    assert "RUNNING HANDLER [rbee_queen" not in preview.output
    assert hive_yaml.read_text() == before  # check mode wrote nothing
    assert deployment.token not in second.output + preview.output
    assert deployment.tls["key"].splitlines()[1] not in second.output + preview.output


@pytest.mark.parametrize("bad, message", [
    ({"rbee_hive_port": "http"},  # the argument specs
     "argument 'rbee_hive_port' is of type str and we were unable to convert to int"),
    ({"rbee_hive_auth_token": "short"},  # the preflight checks
     "rbee_hive_auth_token must be one word of at least 16 printable ASCII characters"),
    ({"rbee_hive_credential": "short"},
     "rbee_hive_credential must be empty (send the token) or one word of at least 32"),
    ({"rbee_hive_config": {"heartbeat": {"interval_s": "often"}}},  # the command's own check
     "heartbeat.interval_s: Expected `float`, got `str`"),
])
def test_bad_variables_fail_with_a_clear_message_and_change_nothing(deployment, bad, message):
    hive_yaml = deployment.path("etc/rbee/hive.yaml")
    before = hive_yaml.read_text()
    result = deployment.run_playbook("--limit", "hive-local", "-e", json.dumps(bad))
    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split()), result.stdout[-3000:]
    assert hive_yaml.read_text() == before
