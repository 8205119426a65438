"""Shared fixtures: real cgroup backends under a root unique to this test run, real processes.

Every fixture that creates something removes it in its finalizer, whether the test passed or not,
and the session ends by checking that no cgroup or worker process of this run is left.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from trio.testing import MockClock

from rbee.hive.cgroups import CgroupBackend, NoCgroup, select_backend
from rbee.hive.cgroups.detect import read_mounts
from rbee.hive.processes import ProcessMonitor

RUN_ROOT = f"rbee-test-{os.getpid()}"
V2_MOUNT, V1_MOUNTS = read_mounts()
IS_ROOT = os.geteuid() == 0

needs_v1 = pytest.mark.skipif(
    not (IS_ROOT and "cpuacct" in V1_MOUNTS and "memory" in V1_MOUNTS),
    reason="needs root and cgroup v1 cpuacct+memory controllers mounted",
)
needs_v2 = pytest.mark.skipif(
    not (IS_ROOT and V2_MOUNT is not None),
    reason="needs root and a cgroup2 filesystem mounted",
)

SLEEP = shutil.which("sleep") or "/bin/sleep"


def sleeper(seconds: int = 600) -> list[str]:
    """A worker that does nothing for a long time: cheap, and killable by SIGTERM."""
    return [SLEEP, str(seconds)]


def busy_worker(model: str = "test-model") -> list[str]:
    """A Python worker that burns CPU and writes to disk, with a --model flag."""
    code = (
        "import os, sys, tempfile, time\n"
        "fd, path = tempfile.mkstemp()\n"
        "os.unlink(path)\n"
        "while True:\n"
        "    sum(range(200000))\n"
        "    os.write(fd, b'x' * 65536); os.fsync(fd)\n"
        "    time.sleep(0.001)\n"
    )
    return [sys.executable, "-c", code, "--model", model]


# The fleet test spends minutes in systemd-nspawn boots, SSH and pip on three hosts, mostly
# waiting, and the long-run test two minutes watching a fleet: under ``./dev test``
# (pytest-xdist, two workers) they run on one worker while the rest of the suite runs on the
# other, each lane in file order, as in one process. The fuzzer and the dashboard's browser
# tests (about a minute together) ride in that lane too, so that the two lanes end together
# (measured: ~7 min of fleet and long run against ~9 min of the rest).
SLOW_LANE = {"test_ansible_fleet.py", "test_long_run.py", "test_fuzz.py", "test_dashboard.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Two lanes, not xdist's ``loadgroup``: its marker trick rewrites ``item._nodeid``, which
    pytest 9.2 no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "fleet" if Path(nodeid.split("::")[0]).name in SLOW_LANE else "suite"

    return Lanes(config, log)


def _backend(kind: str, tag: str) -> CgroupBackend:
    return select_backend(kind, f"{RUN_ROOT}/{tag}")


def _backend_for(request) -> CgroupBackend:
    kind = request.param
    if kind == "v1" and not (IS_ROOT and "cpuacct" in V1_MOUNTS):
        pytest.skip("needs root and cgroup v1 controllers mounted")
    if kind == "v2" and not (IS_ROOT and V2_MOUNT is not None):
        pytest.skip("needs root and a cgroup2 filesystem mounted")
    return _backend(kind, request.node.name.replace("[", "-").replace("]", ""))


@pytest.fixture(params=["v1", "v2", "none"])
def any_backend(request) -> CgroupBackend:
    """Each backend on the real kernel: v1 controllers, the controller-less v2 mount, none."""
    return _backend_for(request)


@pytest.fixture(params=["v1", "v2"])
def cgroup_backend(request) -> CgroupBackend:
    """The two real cgroup backends (not none), for behaviour only a cgroup tree has."""
    return _backend_for(request)


@pytest.fixture
def cgroup_monitor(cgroup_backend):
    yield from _monitor(cgroup_backend)


@pytest.fixture
def v1_backend(request) -> CgroupBackend:
    if not (IS_ROOT and "cpuacct" in V1_MOUNTS):
        pytest.skip("needs root and cgroup v1 controllers mounted")
    return _backend("v1", request.node.name)


@pytest.fixture
def monitor(any_backend):
    yield from _monitor(any_backend)


@pytest.fixture
def v1_monitor(v1_backend):
    yield from _monitor(v1_backend)


def _monitor(backend: CgroupBackend):
    process_monitor = ProcessMonitor(backend)
    try:
        yield process_monitor
    finally:
        process_monitor.stop_all(grace=0.5)
        backend.remove_root()


@pytest.fixture
def none_monitor():
    process_monitor = ProcessMonitor(NoCgroup())
    try:
        yield process_monitor
    finally:
        process_monitor.stop_all(grace=0.5)


def _leftover_cgroups() -> list[Path]:
    mounts = [*V1_MOUNTS.values(), *([V2_MOUNT] if V2_MOUNT else [])]
    return [mount / RUN_ROOT for mount in set(mounts) if (mount / RUN_ROOT).exists()]


@pytest.fixture(scope="session", autouse=True)
def no_cgroup_left_behind():
    """Fails the run if any test leaked a cgroup; removes the run's root either way."""
    yield
    leaked = []
    for root in _leftover_cgroups():
        for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                leaked.append(path)
                try:
                    path.rmdir()
                except OSError:
                    pass
        try:
            root.rmdir()
        except OSError:
            leaked.append(root)
    assert not leaked, f"cgroups left behind: {leaked}"


@pytest.fixture
def mock_clock():
    """trio's MockClock for a test that asks for it (pytest-trio runs the test under it): virtual
    time jumps as soon as every task waits. A file whose tasks wait on real threads overrides it
    with a threshold."""
    return MockClock(autojump_threshold=0)
