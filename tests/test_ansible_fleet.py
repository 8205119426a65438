"""The site playbook against a fleet of three hosts, each with systemd as its PID 1: one queen,
two hives (tests/fleet.py boots them with systemd-nspawn, each in a network namespace of its
own, reached over SSH). What only systemd does is checked on the hosts themselves: the units
enabled and running, the hive's delegated cgroup subtree with its workers under
``<unit>/workers`` as the ``rbee`` user, ``KillMode=process`` restarts re-adopting the same
worker PIDs, handlers restarting only the service whose config changed, the rolling update
going one hive at a time without the queen ever dropping one, and a hive that stops for good
stopping the rollout.

The tests share one deployment and run in file order, each starting from where the one before
left the fleet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from .ansiblekit import EXAMPLE_INVENTORY, REPO, SITE, Run, ansible_env, export_checkout, write_vault
from .daemons import BIN
from .fleet import DEAD_INDEX, Fleet, Host, in_netns, join_netns, missing_machine_features, ssh_identity

MISSING = missing_machine_features()
pytestmark = pytest.mark.skipif(bool(MISSING), reason="this machine lacks: " + "; ".join(MISSING))

QUEEN, HIVES = "queen-1", ("hive-1", "hive-2")
QUEEN_PORT = 7833  # the example inventory's
HIVE_CONFIG = {"collect": {"gpu": "none"}}  # no GPU on these hosts


@dataclass
class Deployment:
    fleet: Fleet
    tree: Path
    inventory: Path
    vault_password: Path
    env: dict[str, str]
    token: str
    runs: list[Run] = field(default_factory=list)

    @property
    def queen(self) -> Host:
        return self.fleet.hosts[QUEEN]

    @property
    def queen_url(self) -> str:
        return f"http://{self.queen.address}:{QUEEN_PORT}"

    def run_playbook(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """``ansible-playbook -i <inventory> site.yml``, as the README's "Deploy to a fleet"."""
        return subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory), "--vault-password-file",
             str(self.vault_password), str(SITE), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout)

    def playbook(self, *args: str) -> Run:
        result = self.run_playbook(*args)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        run = Run.parse(result.stdout)
        assert set(run.changed) == {QUEEN, *HIVES}, result.stdout[-3000:]
        self.runs.append(run)
        return run

    def get(self, path: str) -> object:
        """A GET on the queen, from the controller's network namespace."""
        def fetch() -> object:
            response = httpx.get(self.queen_url + path, timeout=5)
            response.raise_for_status()
            return response.json()
        return in_netns(self.fleet.ctl, fetch)


def write_inventory(tree: Path, fleet: Fleet, key: Path, token: str) -> tuple[Path, Path]:
    """The example's group_vars, the fleet's hosts, and how the controller reaches them: SSH
    as root with the test's key, run in the controller's network namespace."""
    inventory = tree / "inventory"
    for group in ("all", "rbee_queens"):
        shutil.copytree(EXAMPLE_INVENTORY / "group_vars" / group, inventory / "group_vars" / group)
    hosts = fleet.hosts
    (inventory / "hosts.yml").write_text(yaml.safe_dump({
        "rbee_queens": {"hosts": {QUEEN: {"ansible_host": hosts[QUEEN].address}}},
        "rbee_hives": {"hosts": {name: {"ansible_host": hosts[name].address} for name in HIVES}},
    }))
    (tree / "known_hosts").write_text(fleet.known_hosts())
    ssh = tree / "ssh"
    ssh.write_text(f'#!/bin/sh\nexec nsenter --net=/run/netns/{fleet.ctl} -- ssh "$@"\n')
    ssh.chmod(0o755)
    (inventory / "group_vars" / "rbee_hives").mkdir()
    (inventory / "group_vars" / "rbee_hives" / "main.yml").write_text(yaml.safe_dump({
        "rbee_hive_config": HIVE_CONFIG,
        "rbee_hive_workers": [{"group": "demo", "instance": "a", "argv": [
            "/opt/rbee/venv/bin/python", "-m", "rbee.demo.worker", "--model", "fleet-demo",
            "--load", "0.02"]}],
    }))
    (inventory / "group_vars" / "all" / "zz-fleet.yml").write_text(yaml.safe_dump({
        "ansible_user": "root",
        "ansible_ssh_executable": str(ssh),
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": (
            f"-o UserKnownHostsFile={tree / 'known_hosts'} -o StrictHostKeyChecking=yes "
            "-o HostKeyAlgorithms=ssh-ed25519 -o BatchMode=yes"),
        "ansible_ssh_transfer_method": "piped",
        "ansible_python_interpreter": "/usr/bin/python3",
        "rbee_install_source": "checkout",
        "rbee_install_checkout": str(export_checkout(tree / "checkout")),
        "rbee_install_build_dir": str(tree / "wheels"),
        # The hosts have no route out and no index (tests/fleet.py): rbee_install brings the
        # checkout's lock as a wheelhouse built here, with no help from this inventory.
    }))
    return inventory, write_vault(tree, inventory, token)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    tree = tmp_path_factory.mktemp("fleet")
    key, public_key = ssh_identity(tree)
    token = os.urandom(24).hex()
    with Fleet(tree / "hosts", [QUEEN, *HIVES], authorized_key=public_key) as fleet:
        inventory, vault_password = write_inventory(tree, fleet, key, token)
        env = {**ansible_env(tree), "ANSIBLE_PIPELINING": "1",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tree / "cp")}
        deployment = Deployment(fleet, tree, inventory, vault_password, env, token)
        deployment.playbook()
        # Later runs install the wheel the first one built, as rbee_install_source: wheel does:
        # the same file and version, so nothing changes, and no run rebuilds the extension.
        (wheel,) = (tree / "wheels").glob("rbee_telemetry-*.whl")
        (inventory / "group_vars" / "all" / "zzz-built-wheel.yml").write_text(yaml.safe_dump(
            {"rbee_install_source": "wheel", "rbee_install_wheel": str(wheel)}))
        yield deployment


def main_pid(host: Host, unit: str) -> int:
    return int(host.show(unit, "MainPID")["MainPID"])


def listed_workers(deployment: Deployment) -> dict[str, int]:
    """The queen's workers: hive/group/instance → PID, of every hive."""
    return {"{hive_id}/{worker[group]}/{worker[instance]}".format(**w): w["worker"]["pid"]
            for w in deployment.get("/v1/workers")}


def wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def test_hosts_run_systemd_as_pid_1(deployment):
    for host in deployment.fleet.hosts.values():
        assert host.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        state = host.run("systemctl", "is-system-running", check=False).stdout.strip()
        assert state in ("running", "degraded"), host.run("systemctl", "--failed").stdout


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version of each pin in a lock (names normalized, as pip compares them)."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_hosts_run_exactly_the_lock_with_no_index_reachable(deployment):
    """Each host got rbee's dependencies as the role's wheelhouse: no index answers there (pip
    fails to reach the one its config names, or PyPI), yet its virtualenv holds exactly the
    versions of the checkout's lock for its Python."""
    for host in deployment.fleet.hosts.values():
        pip = ["/opt/rbee/venv/bin/python", "-m", "pip"]
        for index in ([], ["--index-url", "https://pypi.org/simple"]):
            probe = host.run(*pip, "download", "--no-deps", "--retries", "0", "--timeout", "3",
                             "--dest", "/tmp/rbee-index-probe", *index, "msgspec", check=False,
                             timeout=60)
            assert probe.returncode != 0, (host.name, index, probe.stdout[-1000:])
        assert DEAD_INDEX in host.run("cat", "/etc/pip.conf").stdout
        version = host.run("/usr/bin/python3", "-c",
                           "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
        frozen = host.run(*pip, "freeze", "--exclude", "rbee-telemetry").stdout
        installed = {re.sub(r"[-_.]+", "-", name).lower(): found for name, found in
                     re.findall(r"^([^=\s]+)==(\S+)$", frozen, re.MULTILINE)}
        assert installed == locked_versions(REPO / "locks" / f"run-py{version}.txt"), host.name


def test_both_units_active_running_and_enabled(deployment):
    fleet = deployment.fleet
    for host, unit in ((fleet.hosts[QUEEN], "rbee-queen"),
                       *((fleet.hosts[name], "rbee-hive") for name in HIVES)):
        state = host.show(unit, "ActiveState", "SubState", "UnitFileState", "User")
        assert state == {"ActiveState": "active", "SubState": "running",
                         "UnitFileState": "enabled", "User": "rbee"}, (host.name, state)
        status = host.run("systemctl", "status", unit, "--no-pager", check=False).stdout
        assert "Active: active (running)" in status, status


def test_hive_owns_a_delegated_cgroup_v2_subtree_as_rbee(deployment):
    """The hive moved itself to <unit>/hive and its worker runs in <unit>/workers/demo/a, both
    as the rbee user, in the cgroup v2 tree nspawn gives the host (no controllers here: this
    machine binds them to its v1 hierarchies)."""
    for name in HIVES:
        host = deployment.fleet.hosts[name]
        assert host.run("stat", "-f", "-c", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
        unit = host.show("rbee-hive", "ControlGroup", "Delegate", "KillMode")
        assert (unit["Delegate"], unit["KillMode"]) == ("yes", "process")
        base = unit["ControlGroup"]
        assert base == "/system.slice/rbee-hive.service"
        hive_pid = main_pid(host, "rbee-hive")
        # /proc/PID/cgroup also lists the kernel's v1 hierarchies; "0::" is the v2 one
        assert f"0::{base}/hive" in host.run("cat", f"/proc/{hive_pid}/cgroup").stdout.split()
        worker_pids = host.run("cat", f"/sys/fs/cgroup{base}/workers/demo/a/cgroup.procs"
                               ).stdout.split()
        assert len(worker_pids) == 1
        rbee_uid = host.run("id", "-u", "rbee").stdout.strip()
        for pid in (hive_pid, worker_pids[0]):
            uids = re.search(r"^Uid:\s+(\d+)", host.run("cat", f"/proc/{pid}/status").stdout,
                             re.MULTILINE)
            assert uids.group(1) == rbee_uid != "0"
        # delegated: the subtree belongs to the service's user
        owner = host.run("stat", "-c", "%U", f"/sys/fs/cgroup{base}/workers").stdout.strip()
        assert owner == "rbee"


def test_queen_lists_both_hives_workers(deployment):
    wait_for(lambda: len(listed_workers(deployment)) == 2, 10, deployment.get("/v1/workers"))
    hives = {h["hive"]["id"]: h for h in deployment.get("/v1/hives")}
    assert set(hives) == set(HIVES) and not any(h["stale"] for h in hives.values())
    for name in HIVES:
        host = deployment.fleet.hosts[name]
        (pid,) = {w["pid"] for w in hives[name]["workers"]}
        unit = host.show("rbee-hive", "ControlGroup")["ControlGroup"]
        assert str(pid) in host.run("cat", f"/sys/fs/cgroup{unit}/workers/demo/a/cgroup.procs"
                                    ).stdout.split()


def test_restart_keeps_the_workers_and_readopts_them(deployment):
    host = deployment.fleet.hosts[HIVES[0]]
    workers = listed_workers(deployment)
    before = main_pid(host, "rbee-hive")
    host.run("systemctl", "restart", "rbee-hive")
    after = main_pid(host, "rbee-hive")
    assert after not in (before, 0)
    assert listed_workers(deployment) == workers  # the queen lists them all along
    cgroup = host.show("rbee-hive", "ControlGroup")["ControlGroup"]
    procs = host.run("cat", f"/sys/fs/cgroup{cgroup}/workers/demo/a/cgroup.procs").stdout
    assert procs.split() == [str(workers[f"{host.name}/demo/a"])]  # the same PID, in place
    wait_for(lambda: "re-adopted worker demo/a" in host.run(
        "journalctl", "-u", "rbee-hive", f"_PID={after}", "--no-pager").stdout,
        10, "the new hive did not re-adopt its worker")


def test_second_run_changes_nothing(deployment):
    second = deployment.playbook()
    assert second.changed == {QUEEN: 0, HIVES[0]: 0, HIVES[1]: 0}, second.output[-4000:]


def test_queen_config_change_restarts_only_the_queen(deployment):
    fleet = deployment.fleet
    queen_before = main_pid(fleet.hosts[QUEEN], "rbee-queen")
    hives_before = {name: main_pid(fleet.hosts[name], "rbee-hive") for name in HIVES}
    config = yaml.safe_load((EXAMPLE_INVENTORY / "group_vars/rbee_queens/main.yml").read_text())
    config["rbee_queen_config"]["stream"]["max_clients"] = 150
    run = deployment.playbook("-e", json.dumps({"rbee_queen_config": config["rbee_queen_config"]}))
    assert run.changed[QUEEN] > 0 and run.changed[HIVES[0]] == run.changed[HIVES[1]] == 0
    assert main_pid(fleet.hosts[QUEEN], "rbee-queen") != queen_before
    assert {name: main_pid(fleet.hosts[name], "rbee-hive") for name in HIVES} == hives_before
    # Persist it, so later runs keep this queen config.
    (deployment.inventory / "group_vars" / "rbee_queens" / "main.yml").write_text(
        yaml.safe_dump(config))


class QueenStream:
    """The queen's SSE stream, read on a thread in the controller's namespace: every event with
    this machine's monotonic time of receipt (the hosts share the kernel's monotonic clock)."""

    def __init__(self, url: str, netns: str) -> None:
        self.events: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, netns), daemon=True)
        self._thread.start()
        assert self._connected.wait(10), "no connection to the queen's stream"

    def _read(self, url: str, netns: str) -> None:
        join_netns(netns)
        with httpx.Client(timeout=httpx.Timeout(5, read=2)) as client, client.stream(
                "GET", url + "/v1/heartbeats/stream") as response:
            self._connected.set()
            lines = response.iter_lines()
            while not self._stop.is_set():
                try:
                    line = next(lines)
                except (httpx.ReadTimeout, StopIteration):
                    break
                if line.startswith("data:"):
                    self.events.append((time.monotonic(), json.loads(line[5:])))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def monotonic_start(host: Host, unit: str) -> float:
    """When systemd started the unit's main process, on the kernel's monotonic clock."""
    return int(host.show(unit, "ExecMainStartTimestampMonotonic")[
        "ExecMainStartTimestampMonotonic"]) / 1e6


def test_rolling_update_goes_one_hive_at_a_time(deployment):
    """A hive config change with rbee_hive_batch=1: hive-1 restarts and is reported by the
    queen again before hive-2 restarts; the queen's stream never removes a hive; the queen
    itself is not restarted; the workers run on."""
    fleet = deployment.fleet
    queen_before = main_pid(fleet.hosts[QUEEN], "rbee-queen")
    workers = listed_workers(deployment)
    stream = QueenStream(deployment.queen_url, fleet.ctl)
    try:
        changed = {**HIVE_CONFIG, "heartbeat": {"read_timeout_s": 4.0}}
        run = deployment.playbook("-e", "rbee_hive_batch=1",
                                  "-e", json.dumps({"rbee_hive_config": changed}))
    finally:
        stream.close()
    assert run.changed[QUEEN] == 0 and run.changed[HIVES[0]] > 0 and run.changed[HIVES[1]] > 0
    assert main_pid(fleet.hosts[QUEEN], "rbee-queen") == queen_before
    assert run.output.count("PLAY [Roll out the rbee hives]") == 2  # one batch a hive
    first, second = (monotonic_start(fleet.hosts[name], "rbee-hive") for name in HIVES)
    assert first < second
    reported = [at for at, event in stream.events
                if event["type"] == "hive_telemetry" and event["hive_id"] == HIVES[0]]
    assert any(first < at < second for at in reported), (first, second, reported[-5:])
    types = {event["type"] for _, event in stream.events}
    assert "hive_removed" not in types and "hive_telemetry" in types, types
    assert listed_workers(deployment) == workers


def test_a_hive_stopped_for_good_stops_the_rollout(deployment):
    """hive-1 stops for good on the restart the rollout gives it: a runtime drop-in makes its
    ExecStart exit with status 2, which the unit never restarts (RestartPreventExitStatus=2, as
    for a config error). The play stops at hive-1 with a message that names the hive, the queen
    and what systemd says, and hive-2 keeps its config and its running hive."""
    fleet = deployment.fleet
    broken, other = (fleet.hosts[name] for name in HIVES)
    other_pid = main_pid(other, "rbee-hive")
    other_config = other.run("cat", "/etc/rbee/hive.yaml").stdout
    drop_in = "/run/systemd/system/rbee-hive.service.d/zz-stop-for-good.conf"
    broken.run("mkdir", "-p", os.path.dirname(drop_in))
    broken.run("sh", "-c", "printf '[Service]\\nExecStart=\\nExecStart=/bin/sh -c \"exit 2\"\\n' "
               f"> {drop_in}")
    try:
        changed = {**HIVE_CONFIG, "heartbeat": {"read_timeout_s": 3.0}}
        result = deployment.run_playbook("-e", "rbee_hive_batch=1", "-e",
                                         "rbee_hive_wait_for_queen_retries=6",
                                         "-e", json.dumps({"rbee_hive_config": changed}))
        state = broken.show("rbee-hive", "ActiveState", "Result")
        assert state == {"ActiveState": "failed", "Result": "exit-code"}, state
    finally:
        broken.run("rm", "-f", drop_in)
        broken.run("systemctl", "daemon-reload")
        broken.run("systemctl", "start", "rbee-hive")
    output = " ".join(result.stdout.split())
    assert result.returncode != 0
    assert (f"rbee-hive on {HIVES[0]} did not report to the queen at {deployment.queen_url} "
            "within 6 s of its service step (systemd says: Result=exit-code ActiveState=failed "
            "SubState=failed)") in output, \
        result.stdout[-4000:]
    assert "The rollout stops here" in output
    recap = Run.parse(result.stdout).changed
    assert HIVES[1] not in recap or recap[HIVES[1]] == 0, recap
    assert main_pid(other, "rbee-hive") == other_pid
    assert other.run("cat", "/etc/rbee/hive.yaml").stdout == other_config


def test_systemd_analyze_security(deployment):
    """The exposure scores systemd gives the units with the services under them (README)."""
    scores = {}
    for host, unit in ((deployment.queen, "rbee-queen"),
                       (deployment.fleet.hosts[HIVES[1]], "rbee-hive")):
        output = host.run("systemd-analyze", "security", "--no-pager", unit).stdout
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", output)
        assert match, output[-2000:]
        scores[unit] = float(match.group(1))
    print("exposure", scores)
    assert scores == {"rbee-queen": 1.3, "rbee-hive": 4.8}, scores  # README: what each leaves open
