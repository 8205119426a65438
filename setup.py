"""Build and install rbee telemetry.

The Cython extensions ``rbee._cstat`` (the hive's stat files) and ``rbee._cmask`` (the queen's
channel frames) are built from ``ext/``; the built-in collectors in
``collectors/`` are installed as ``rbee.collectors`` and registered through the same entry-point
group, ``rbee.collectors``, that third-party collector plugins use.
"""

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

extensions = cythonize(
    [Extension(f"rbee.{name}", [f"ext/{name}.pyx"], extra_compile_args=["-O2"])
     for name in ("_cstat", "_cmask")],
    compiler_directives={"language_level": "3"},
)

setup(
    name="rbee-telemetry",
    version="0.1.0",
    description="Telemetry pipeline for GPU inference fleets: hive agents, a queen, a live stream.",
    python_requires=">=3.11",
    # every package under rbee/ and collectors/ (a new subpackage ships without a line here)
    packages=[*find_packages(include=["rbee", "rbee.*"]),
              "rbee.collectors", *(f"rbee.collectors.{name}" for name in find_packages("collectors"))],
    package_dir={"rbee.collectors": "collectors"},
    package_data={"rbee": ["py.typed"], "rbee.demo": ["*.yaml"],
                  "rbee.queen": ["static/*.html", "static/*.js", "static/*.css", "static/*.svg",
                                 "static/vendor/*"]},
    ext_modules=extensions,
    install_requires=[
        "pluggy>=1.5",
        "trio>=0.27",
        "httpx>=0.27",
        "msgspec>=0.18.6",
        "PyYAML>=6.0.1",
        "nvidia-ml-py>=12.535",
        # rbee/http/transport.py subclasses hypercorn's trio TCPServer and protocol classes (not its
        # public API): below the next minor release, whose internals are untried
        # (tests/test_internals_canary.py names each one; ./dev test --latest tries new ones)
        "hypercorn>=0.17,<0.19",
        "starlette>=0.49.1",
        "sse-starlette>=3.0",
        "anyio>=4.7",
        "httpx-sse>=0.4",
        "prometheus-client>=0.20",
        # the redis store (registry.store.kind: redis): its async client runs on trio (anyio)
        "valkey-glide>=2.6",
        # the queen's history: columns of float16 points, recorded for the whole fleet at once
        "numpy>=1.26",
        # the hive's channel to its queen: WebSockets for httpx, on anyio (so on trio)
        "httpx-ws>=0.7",
        # rbee top: the terminal view operators drive with keys
        "textual>=1.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.2",
            "pytest-trio>=0.8",
            "pytest-benchmark>=4.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "psutil>=5.9",
            # TLS tests make their CA and certificates on the fly
            "trustme>=1.1",
            # tests pip-install examples/rbee-plugin-example offline, without build isolation:
            # bdist_wheel is part of setuptools from 70.1 on
            "setuptools>=70.1",
            # the dashboard's tests drive Debian's chromium through its chromedriver
            "selenium>=4.20",
            # the Ansible roles' tests: a real playbook run, and the linter's production profile
            "ansible-core>=2.17",
            "ansible-lint>=25.1",
        ],
        "lint": ["ruff>=0.5"],
        # ./dev lock: uv compiles the hashed locks in locks/ (docs/development.md, "The lock")
        "lock": ["uv>=0.9"],
    },
    entry_points={
        "console_scripts": [
            "rbee = rbee.cli:main",
            "rbee-hive = rbee.hive.main:main",
            "rbee-queen = rbee.queen.main:main",
        ],
        "rbee.collectors": [
            "cgroup = rbee.collectors.cgroup",
            "process = rbee.collectors.process",
            "gpu = rbee.collectors.gpu",
            "engine = rbee.collectors.engine",
        ],
    },
)
