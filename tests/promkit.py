"""A real Prometheus (Debian's ``prometheus`` package) for tests: scrapes given targets on
127.0.0.1 every second into a temporary TSDB, and answers PromQL over its HTTP API.

Where the binary is missing the test is skipped naming the package, except under ``CI=true``,
where ``./dev test`` must have installed it and its absence fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .queenkit import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def require_prometheus() -> None:
    if PROMETHEUS and PROMTOOL:
        return
    message = "needs Debian's prometheus package (prometheus, promtool): apt-get install prometheus"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Prometheus:
    def __init__(self, tmp_path: Path, targets: dict[str, str],
                 credentials_files: dict[str, Path] | None = None) -> None:
        """``targets``: job name -> base URL (``http://127.0.0.1:PORT``) serving /metrics;
        ``credentials_files``: job name -> a file holding the bearer token that job sends (the
        queen's read token), as the README's scrape config says."""
        credentials_files = credentials_files or {}
        require_prometheus()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "honor_labels": True,  # as the README says: ours describe workers
                 "static_configs": [{"targets": [url.split("//", 1)[1]]}],
                 **({"authorization": {"credentials_file": str(credentials_files[job])}}
                    if job in credentials_files else {})}
                for job, url in targets.items()],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (tmp_path / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={self.url.split('//', 1)[1]}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.url, timeout=5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"prometheus did not get ready: {(tmp_path / 'prometheus.log').read_text()}")

    def query(self, expr: str) -> list[dict]:
        answer = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict]:
        """The result of ``expr`` once it has one (scrapes are every second)."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no result for {expr} in {timeout}s"
            time.sleep(0.25)
        return result

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def promtool_check(exposition: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, text=True,
                          capture_output=True, timeout=30)
