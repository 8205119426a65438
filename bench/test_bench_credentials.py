"""What checking a hive's credential costs on every heartbeat: the salted SHA-256 that
``rbee/credentials.py`` uses (secrets are 256 random bits), against the obvious alternative, a
password hash (scrypt at n=2**14, r=8, p=1, the usual interactive-login cost). The ratio is printed.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from rbee.credentials import HiveCredentials, new_credential

from .conftest import FIGURES, MEDIANS, record


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    path = tmp_path_factory.mktemp("credentials") / "hive-credentials"
    made = [new_credential(f"gpu-{n:04}") for n in range(1000)]
    path.write_text("".join(line + "\n" for _, line in made))
    return HiveCredentials(str(path)), made[500][0]


def test_verify_sha256(benchmark, credentials):
    checker, secret = credentials
    assert benchmark(checker.verify, "gpu-0500", secret)
    record(benchmark, "credential sha256")


def test_verify_scrypt(benchmark, credentials):
    _, secret = credentials
    salt = b"0123456789abcdef"
    stored = hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1)

    def verify() -> bool:
        return hmac.compare_digest(
            hashlib.scrypt(secret.encode(), salt=salt, n=2**14, r=8, p=1), stored)

    assert benchmark.pedantic(verify, rounds=10, iterations=1)
    record(benchmark, "credential scrypt")
    fast = MEDIANS.get("credential sha256")
    if fast:
        slow = MEDIANS["credential scrypt"]
        FIGURES["credential check per heartbeat, scrypt / sha256"] = (
            f"{slow / fast:,.0f}x ({slow * 1e3:.1f} ms vs {fast * 1e6:.2f} us)")
