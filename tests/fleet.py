"""A test fleet on this machine: Debian hosts, each booted by ``systemd-nspawn -b`` with systemd
as its PID 1, each in a network namespace of its own, reached by Ansible over SSH.

Why these parts: the roles' systemd side (enabling units, handlers, ``Delegate=yes``, the
hardening, the rolling update) only runs where systemd is PID 1, and this machine's PID 1 is
not. nspawn boots a real Debian userland with ``--register=no --keep-unit`` (no systemd or D-Bus
on this side to register with) and, with ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``, gives each
host a pure cgroup v2 tree even though this machine mounts v1 controllers (so that tree has no
controllers: they stay bound to the v1 hierarchies).

Layout, all made by :class:`Fleet` and removed on exit::

    netns <prefix>-ctl   bridge br0 10.213.0.1/24   the controller's side: ssh, the test's HTTP
      ├─ veth ─ netns <prefix>-<host>  eth0 10.213.0.10+i/24   systemd-nspawn --network-namespace-path
      └─ …

The root filesystem is built once by ``debootstrap`` and cached under :data:`CACHE`, keyed by a
hash of what goes into it; each host boots an overlay of it, so the cache stays pristine. It
holds no Python package beyond Debian's: the hosts have no route out, and their pip config
points at a dead index (:data:`DEAD_INDEX`), so rbee and its dependencies reach them only as the
role's wheelhouse, built from the lock on the controller.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-packaging",
            "iproute2",
            "openssh-server", "sudo", "procps")
CACHE = Path(os.environ.get("RBEE_FLEET_CACHE", "/var/cache/rbee-test"))
SUBNET = "10.213.0"
DEAD_INDEX = f"http://{SUBNET}.1:9/simple"
"""The hosts' pip index (/etc/pip.conf): the controller's side of the bridge, where nothing
listens, so a pip that looks for an index fails at once instead of waiting on a route."""
PIP_CONF = f"[global]\nindex-url = {DEAD_INDEX}\nretries = 0\ntimeout = 3\n"
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "ip", "ssh", "ssh-keygen", "mount")
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
"""Where nspawn's own cgroup lives on this machine (name=systemd v1, and cgroup2)."""
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def missing_machine_features() -> list[str]:
    """What this machine lacks for the fleet, named exactly (empty: it can boot one)."""
    missing = [f"the command {tool} (apt-get install systemd-container debootstrap "
               "openssh-client iproute2 util-linux)" for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces, overlay mounts, systemd-nspawn)")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists() and not any(
            (path / "cgroup.procs").exists() for path in CGROUP_HIERARCHIES):
        missing.append("a cgroup hierarchy for systemd-nspawn")
    return missing


def run(argv: list[str], *, timeout: float = 60, check: bool = True, **kwargs
        ) -> subprocess.CompletedProcess:
    """A command with its output captured, under a timeout; a failure shows its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}: {result.stdout[-2000:]}"
                             f"{result.stderr[-2000:]}")
    return result


def rootfs() -> Path:
    """The cached root filesystem, built on first use (a few minutes; it downloads Debian
    packages, the only network this module uses). Built in a temporary directory and renamed
    into place, under a lock, so a killed build or two concurrent runs never leave a half-made
    cache."""
    key = hashlib.sha256(repr((SUITE, MIRROR, PACKAGES, PIP_CONF)).encode()).hexdigest()[:16]
    target = CACHE / f"rootfs-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        building = CACHE / f"building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                 str(building), MIRROR], timeout=1200)
            (building / "etc/pip.conf").write_text(PIP_CONF)
            # The image's own ssh host keys would be shared by every host: each gets its own.
            for key_file in (building / "etc/ssh").glob("ssh_host_*"):
                key_file.unlink()
            (building / "etc/machine-id").write_text("")  # systemd makes one at each boot
            building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


def in_netns(netns: str, function: Callable[[], T]) -> T:
    """``function()`` called on a thread that has joined ``netns``: sockets it opens live there
    (a network namespace is per thread), so this process talks to the fleet without leaving
    this machine's own network."""
    result: list[T] = []
    error: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            join_netns(netns)
            result.append(function())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=enter_and_call, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def join_netns(netns: str) -> None:
    """Move the calling thread into ``netns`` (from ``ip netns add``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One booted host. ``run`` executes a command inside it (its mount, PID, network and
    cgroup namespaces, as root), the way an operator's shell on that host would."""

    name: str
    address: str
    netns: str
    machine: str
    tree: Path
    process: subprocess.Popen | None = None
    leader: int = 0
    cgroups: list[Path] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.tree / "root"

    def run(self, *argv: str, timeout: float = 60, check: bool = True
            ) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
                    "--pid", "--cgroup", "--", *argv], timeout=timeout, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` of ``unit``: the values systemd itself holds."""
        output = self.run("systemctl", "show", unit, "--property=" + ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


class Fleet:
    """The hosts named in ``names``, booted; a context manager that removes all it made."""

    def __init__(self, tree: Path, names: list[str], *, authorized_key: str) -> None:
        self.tree = tree
        self.prefix = f"rb{os.getpid() % 100000}"
        self.ctl = f"{self.prefix}-ctl"
        self.authorized_key = authorized_key
        self.hosts = {name: Host(name, f"{SUBNET}.{10 + i}", f"{self.prefix}-{i}",
                                 f"{self.prefix}-{name}", tree / name)
                      for i, name in enumerate(names)}
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Fleet:
        try:
            image = rootfs()
            self._network()
            for index, host in enumerate(self.hosts.values()):
                self._link(index, host)
                self._overlay(image, host)
                self._boot(host)
            for host in self.hosts.values():
                self._wait_until_running(host)
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    # -- network --------------------------------------------------------------------------------

    def _network(self) -> None:
        run(["ip", "netns", "add", self.ctl])
        self._exit.callback(run, ["ip", "netns", "delete", self.ctl], check=False)
        for command in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                        ["addr", "add", f"{SUBNET}.1/24", "dev", "br0"],
                        ["link", "set", "br0", "up"]):
            run(["ip", "-n", self.ctl, *command])

    def _link(self, index: int, host: Host) -> None:
        """The host's namespace and a veth from it to the bridge. The host's side is set up
        from here: nspawn withholds CAP_NET_ADMIN from a container given a namespace path."""
        run(["ip", "netns", "add", host.netns])
        self._exit.callback(run, ["ip", "netns", "delete", host.netns], check=False)
        outer, inner = f"{self.prefix}v{index}", f"{self.prefix}p{index}"
        run(["ip", "-n", self.ctl, "link", "add", outer, "type", "veth", "peer", "name", inner,
             "netns", host.netns])
        run(["ip", "-n", self.ctl, "link", "set", outer, "master", "br0", "up"])
        for command in (["link", "set", inner, "name", "eth0"], ["link", "set", "lo", "up"],
                        ["addr", "add", f"{host.address}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"]):
            run(["ip", "-n", host.netns, *command])

    # -- root filesystem --------------------------------------------------------------------------

    def _overlay(self, image: Path, host: Host) -> None:
        upper, work = host.tree / "upper", host.tree / "work"
        for path in (upper, work, host.root):
            path.mkdir(parents=True)
        self._exit.callback(shutil.rmtree, host.tree, ignore_errors=True)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={image},upperdir={upper},workdir={work}", str(host.root)])
        self._exit.callback(run, ["umount", str(host.root)], check=False)
        (host.root / "etc/hostname").write_text(host.name + "\n")
        ssh = host.root / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(self.authorized_key)
        (ssh / "authorized_keys").chmod(0o600)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f",
             str(host.root / "etc/ssh/ssh_host_ed25519_key")])

    def known_hosts(self) -> str:
        """A known_hosts file's lines: each host's address and its own new host key."""
        return "".join(
            f"{host.address} "
            + " ".join((host.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])
            + "\n" for host in self.hosts.values())

    # -- boot -------------------------------------------------------------------------------------

    def _boot(self, host: Host) -> None:
        """nspawn in a cgroup of its own (it makes ``payload``/``supervisor`` under its own
        cgroup, so two hosts must not share one), its console to a log file."""
        host.cgroups = [hierarchy / "rbee-fleet" / host.machine
                        for hierarchy in CGROUP_HIERARCHIES if (hierarchy / "cgroup.procs").exists()]
        for cgroup in host.cgroups:
            cgroup.mkdir(parents=True, exist_ok=True)
        self._exit.callback(remove_cgroups, host.cgroups)
        self._exit.callback(shutil.rmtree, Path("/run/systemd/nspawn/propagate") / host.machine,
                            ignore_errors=True)
        join = " && ".join(f"echo $$ > {cgroup}/cgroup.procs" for cgroup in host.cgroups)
        log = (host.tree / "console.log").open("w")
        self._exit.callback(log.close)
        host.process = subprocess.Popen(
            ["sh", "-c", f'{join} && exec "$@"', "sh", "systemd-nspawn", "--quiet",
             f"--directory={host.root}", "--boot", "--register=no", "--keep-unit",
             f"--machine={host.machine}", f"--hostname={host.name}",
             f"--network-namespace-path=/run/netns/{host.netns}", "--link-journal=no"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"})
        self._exit.callback(power_off, host)
        deadline = time.monotonic() + 30
        while not host.leader:
            assert host.process.poll() is None, console(host)
            assert time.monotonic() < deadline, "nspawn started no container\n" + console(host)
            time.sleep(0.05)
            host.leader = container_init(host.process.pid)

    def _wait_until_running(self, host: Host) -> None:
        deadline = time.monotonic() + 90
        state = ""
        while state not in ("running", "degraded"):
            assert host.process.poll() is None, console(host)
            assert time.monotonic() < deadline, f"{host.name} is {state!r}\n" + console(host)
            time.sleep(0.2)
            state = host.run("systemctl", "is-system-running", check=False).stdout.strip()


def container_init(nspawn: int) -> int:
    """The PID (here) of the container's systemd: the child of nspawn that is PID 1 in its own
    PID namespace and has exec'd systemd. nspawn forks a short-lived helper first, so the first
    child seen is not necessarily it; 0 while there is none yet."""
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{child}/status").read_text()
                fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
                if fields.get("Name") == "systemd" and fields.get("NSpid", "").split()[-1] == "1":
                    return int(child)
    return 0


def console(host: Host) -> str:
    path = host.tree / "console.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def power_off(host: Host) -> None:
    """SIGTERM makes nspawn ask the container's systemd to power off; SIGKILL if it hangs."""
    if host.process is None or host.process.poll() is not None:
        return
    host.process.send_signal(signal.SIGTERM)
    try:
        host.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        host.process.kill()
        host.process.wait(timeout=30)


def remove_cgroups(cgroups: list[Path]) -> None:
    """The cgroups nspawn ran in, children first (all empty once the container is gone)."""
    for cgroup in cgroups:
        if cgroup.exists():
            for path in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
            with contextlib.suppress(OSError):
                cgroup.parent.rmdir()  # rbee-fleet, once no other run uses it


def ssh_identity(tree: Path) -> tuple[Path, str]:
    """A new key pair for the controller: (private key path, public key line)."""
    key = tree / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rbee-fleet-test", "-f", str(key)])
    return key, key.with_suffix(".pub").read_text()
