"""A real browser for the dashboard's tests: Debian's ``chromium``, headless, driven by Selenium
through Debian's ``chromium-driver`` (both from apt; nothing is downloaded at run time, so it works
offline).

Where either is missing the test is skipped naming the packages, except under ``CI=true``, where
``./dev test`` must have installed them and their absence fails the test. The browser always quits
(chromedriver and every chromium process with it), whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def require_chromium() -> None:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER))
               if not (os.access(path, os.X_OK) or shutil.which(Path(path).name) == path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not missing:
        return
    message = f"needs Debian's chromium and chromium-driver, and selenium: missing {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def chromium(tmp_path: Path, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (``--no-sandbox``: the tests run as root) with its console kept for
    ``console_errors``; every command times out."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--disable-extensions",
                     "--no-first-run", "--disable-background-networking"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromium leaves its singleton socket's folder (``org.chromium.Chromium.*``) in TMPDIR:
    # a folder of ours, removed on the way out (short, as a socket's path must be)
    with tempfile.TemporaryDirectory(prefix="rbee-chromium-") as scratch:
        service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"),
                          env={**os.environ, "TMPDIR": scratch})
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(20)
            driver.set_script_timeout(20)
            yield driver
        finally:
            driver.quit()


def console_errors(driver, allowed: Callable[[str], bool] = lambda message: False) -> list[str]:
    """The browser console's errors since the last call, less those ``allowed`` accepts."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not allowed(entry["message"])]


def wait_for(driver, script: str, predicate: Callable[[Any], bool], timeout: float = 10.0,
             poll: float = 0.02) -> Any:
    """Run ``script`` (``return …``) in the page until ``predicate`` holds for its value; fails
    the test after ``timeout`` seconds with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            console = [entry["message"] for entry in driver.get_log("browser")]
            raise AssertionError(f"after {timeout}s, {script!r} gave {value!r}; "
                                 f"the browser's console: {console}")
        time.sleep(poll)


WORKER_KEYS = "return window.rbeeDashboard ? window.rbeeDashboard.workerKeys() : null"
CONNECTION = "return document.getElementById('connection-text').textContent"
