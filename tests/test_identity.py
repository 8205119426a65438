"""Per-hive credentials and the read token, on a real queen (127.0.0.1, port 0).

Credentials are made the way an operator makes them (``rbee credential new``, a real
subprocess) or with the same function; the hive side is the product's HeartbeatSender posting
from a real hive agent. Impersonation is tried as the issue's attacker would: posting as another
hive, advertising its VRAM, saying goodbye for it, removing it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from rbee import ConfigError
from rbee.cli import main as rbee_main
from rbee.contract import OperationalStatus, encode
from rbee.credentials import HiveCredentials, new_credential, parse_credentials, read_secret
from rbee.hive.main import check
from rbee.http.auth import bearer, hive_basic

from .builders import GIB, gpu, heartbeat, worker
from .hivekit import hive_config, start_hive
from .queenkit import STREAM_PATH, start_queen, url_of, wait_until

RBEE = str(Path(sys.executable).with_name("rbee"))
TOKEN = "admin-token-0123456789abcdef"


def cli_credential(hive_id: str) -> tuple[str, str]:
    """A credential made by ``rbee credential new``: (secret, line for the queen's file)."""
    result = subprocess.run([RBEE, "credential", "new", hive_id], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    secret = result.stderr.splitlines()[1]  # the secret is shown once, on stderr
    (line,) = result.stdout.splitlines()  # stdout is the line alone, for `>> file`
    assert line.startswith(f"{hive_id}:sha256$") and secret not in line
    return secret, line


@pytest.fixture
async def fleet(nursery, tmp_path):
    """A queen with credentials for gpu-07 and gpu-08, and the shared token as admin power."""
    secrets, lines = {}, []
    for hive_id in ("gpu-07", "gpu-08"):
        secrets[hive_id], line = new_credential(hive_id)
        lines.append(line)
    credentials = tmp_path / "hive-credentials"
    credentials.write_text("# hive_id:scheme$salt$hash\n" + "\n".join(lines) + "\n")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    queen = await start_queen(nursery, hive_credentials_file=str(credentials),
                              auth_token_file=str(token))
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5.0) as client:
        yield queen, client, secrets, credentials


def as_hive(secrets: dict[str, str], hive_id: str) -> dict[str, str]:
    return hive_basic(hive_id, secrets[hive_id])


async def test_a_hive_posts_only_as_itself(fleet):
    queen, client, secrets, _ = fleet
    honest = heartbeat("gpu-07", [worker("w", gpu_indices=[0], vram_mb=70 * GIB)],
                       [gpu(0, total_gib=80, used_gib=70)])
    response = await client.post("/v1/hive-heartbeat", content=encode(honest),
                                 headers=as_hive(secrets, "gpu-07"))
    assert response.status_code == 200, response.text
    # gpu-08's credential, advertising 10,000,000 MiB free on gpu-07
    forged = heartbeat("gpu-07", [worker("w", gpu_indices=[0], vram_mb=1.0)],
                       [gpu(0, total_gib=10_000_000 / 1024, used_gib=0)])
    refused = await client.post("/v1/hive-heartbeat", content=encode(forged),
                                headers=as_hive(secrets, "gpu-08"))
    assert (refused.status_code, refused.json()["message"]) == (
        403, "the credential of hive 'gpu-08' cannot post as hive 'gpu-07'")
    found = await client.get("/v1/workers", params={"idle": "true",
                                                    "min_free_vram_mb": 1_000_000})
    assert found.json() == []
    assert queen.registry.get_hive("gpu-07").capabilities == honest.capabilities
    # nor its goodbye, which would remove it at once
    goodbye = heartbeat("gpu-07", status=OperationalStatus.STOPPED)
    refused = await client.post("/v1/hive-heartbeat", content=encode(goodbye),
                                headers=as_hive(secrets, "gpu-08"))
    assert refused.status_code == 403
    assert queen.registry.hive_ids() == ["gpu-07"]
    own = await client.post("/v1/hive-heartbeat", content=encode(goodbye),
                            headers=as_hive(secrets, "gpu-07"))
    assert own.status_code == 200 and queen.registry.hive_ids() == []


async def test_a_hive_removes_only_itself_and_the_token_removes_any(fleet):
    queen, client, secrets, _ = fleet
    for hive_id in ("gpu-07", "gpu-08"):
        response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat(hive_id)),
                                     headers=as_hive(secrets, hive_id))
        assert response.status_code == 200
    refused = await client.delete("/v1/hives/gpu-07", headers=as_hive(secrets, "gpu-08"))
    assert (refused.status_code, refused.json()["message"]) == (
        403, "the credential of hive 'gpu-08' cannot remove hive 'gpu-07' (only itself; the "
             "shared token can)")
    assert (await client.delete("/v1/hives/gpu-08", headers=as_hive(secrets, "gpu-08"))
            ).status_code == 200
    assert (await client.delete("/v1/hives/gpu-07", headers=bearer(TOKEN))).status_code == 200
    assert queen.registry.hive_ids() == []


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, "needs a hive credential (Authorization: Basic base64(hive_id:secret)) or the "
         "shared token"),
    (hive_basic("gpu-07", "x" * 43), "wrong credential for hive 'gpu-07'"),
    (hive_basic("gpu-99", "x" * 43), "wrong credential for hive 'gpu-99'"),
    ({"authorization": "Basic !!!"}, "wrong credential for hive None"),
    (bearer("wrong-token-0123456789"), "wrong token"),
])
async def test_a_wrong_or_missing_credential_is_401(fleet, headers, expected):
    queen, client, _, _ = fleet
    response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat("gpu-07")),
                                 headers=headers)
    assert response.status_code == 401
    assert expected in response.json()["message"]
    assert queen.registry.hive_ids() == []


async def test_the_credential_is_checked_before_the_body_is_read(fleet):
    """Headers announcing 1 MiB and no body at all: a wrong credential is answered at once."""
    queen, _, _, _ = fleet
    host, port = url_of(queen).removeprefix("http://").rsplit(":", 1)
    auth = hive_basic("gpu-07", "y" * 43)["authorization"]
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST /v1/hive-heartbeat HTTP/1.1\r\nHost: q\r\nAuthorization: {auth}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
                     .encode())
        head = await trio.to_thread.run_sync(sock.recv, 4096)
    assert head.startswith(b"HTTP/1.1 401")


async def test_the_credentials_file_is_reread_without_a_restart(fleet, caplog):
    _, client, secrets, path = fleet
    secret, line = new_credential("gpu-09")
    body = encode(heartbeat("gpu-09"))

    async def post_as_gpu_09() -> int:
        response = await client.post("/v1/hive-heartbeat", content=body,
                                     headers=hive_basic("gpu-09", secret))
        return response.status_code

    assert await post_as_gpu_09() == 401
    path.write_text(path.read_text() + line + "\n")  # added
    with trio.fail_after(5):
        while await post_as_gpu_09() != 200:
            await trio.sleep(0.1)
    path.write_text(path.read_text() + "gpu-10:md5$00$00\n")  # a bad edit keeps what was read
    with trio.fail_after(5):  # until the queen has read it (each request may check the file)
        while "credentials read before" not in caplog.text:
            assert await post_as_gpu_09() == 200
            await trio.sleep(0.1)
    assert await post_as_gpu_09() == 200
    path.write_text("".join(f"{kept}\n" for kept in path.read_text().splitlines()
                            if kept.startswith("gpu-07")))  # revoked: gpu-08, gpu-09
    with trio.fail_after(5):
        while await post_as_gpu_09() != 401:
            await trio.sleep(0.1)
    response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat("gpu-07")),
                                 headers=as_hive(secrets, "gpu-07"))
    assert response.status_code == 200


async def test_a_hive_sends_its_own_credential(nursery, fleet, tmp_path):
    """The product's hive: ``credential_file`` in its config, its agent and sender."""
    queen, _, secrets, _ = fleet
    secret_file = tmp_path / "gpu-08.secret"
    secret_file.write_text(secrets["gpu-08"] + "\n")
    config = hive_config("credential", id="gpu-08", credential_file=str(secret_file),
                         heartbeat={"interval_s": 0.2})
    await start_hive(nursery, config, url_of(queen),
                     credential=(config.id, read_secret(config.credential_file)))
    await wait_until(lambda: queen.registry.hive_ids() == ["gpu-08"])


def test_credentials_files_are_validated_naming_the_line(tmp_path):
    _, good = new_credential("gpu-01")
    assert list(parse_credentials(f"# comment\n\n{good}\n", "f")) == ["gpu-01"]
    for text, problem in [
        ("gpu-01 sha256$aa$bb", "line 1: expected hive_id:sha256$salt$hash"),
        ("gpu-01:scrypt$aa$" + "0" * 64, "line 1: unknown or missing scheme"),
        ("gpu-01:sha256$aa$beef", "the hash must be lower-case hex, the hash 64 digits"),
        (f"{good}\n{good}", "line 2: hive 'gpu-01' is listed twice"),
    ]:
        with pytest.raises(ConfigError, match=problem.replace("$", r"\$")):
            parse_credentials(text, "f")
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError, match="hive_credentials_file: cannot read"):
        HiveCredentials(str(missing))
    secret_file = tmp_path / "short"
    secret_file.write_text("too-short")
    config = hive_config("short-secret", credential_file=str(secret_file))
    with pytest.raises(ConfigError, match=r"hive.yaml: credential_file: credential file .* must "
                                          r"hold one secret of at least 32"):
        check(config, "hive.yaml")  # what --check-config and start-up run


def test_rbee_credential_new_makes_what_the_queen_checks(tmp_path, capsys):
    secret, line = cli_credential("gpu-07")
    (tmp_path / "credentials").write_text(line + "\n")
    credentials = HiveCredentials(str(tmp_path / "credentials"))
    assert credentials.verify("gpu-07", secret)
    assert not credentials.verify("gpu-07", secret[:-1] + ("B" if secret.endswith("A") else "A"))
    assert not credentials.verify("gpu-08", secret)
    target = tmp_path / "gpu-01.secret"  # the same command, in-process (no start-up cost)
    assert rbee_main(["credential", "new", "gpu-01", "--secret-file", str(target)]) == 0
    out, err = capsys.readouterr()
    salt, hashed = out.strip().split(":", 1)[1].split("$")[1:]
    secret = target.read_text().strip()
    assert secret not in out + err
    assert (os.stat(target).st_mode & 0o777) == 0o600
    assert parse_credentials(out, "stdout") == {"gpu-01": (salt, hashed)}
    assert rbee_main(["credential", "new", "gpu-01", "--secret-file", str(target)]) == 1
    assert "cannot create" in capsys.readouterr().err  # never overwritten
    assert target.read_text().strip() == secret


# -- the read token ------------------------------------------------------------------------

READ_TOKEN = "read-token-0123456789abcdef"
READ_PATHS = ["/v1/hives", "/v1/hives/gpu-01", "/v1/workers", "/v1/history", "/metrics"]


@pytest.fixture
async def guarded(nursery, tmp_path):
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    (tmp_path / "token").write_text(TOKEN)
    queen = await start_queen(nursery, read_token_file=str(tmp_path / "read"),
                              auth_token_file=str(tmp_path / "token"))
    async with httpx.AsyncClient(base_url=url_of(queen), timeout=5.0) as client:
        response = await client.post("/v1/hive-heartbeat", content=encode(heartbeat("gpu-01", [worker("w")])),
                                     headers=bearer(TOKEN))
        assert response.status_code == 200
        yield queen, client


@pytest.mark.parametrize("path", [*READ_PATHS, STREAM_PATH])
async def test_each_read_path_asks_for_the_read_token(guarded, path):
    _, client = guarded
    refused = await client.get(path)
    assert refused.status_code == 401 and "needs the read token" in refused.json()["message"]
    wrong = await client.get(path, headers=bearer("not-the-read-token-000"))
    assert wrong.status_code == 401 and "wrong token" in wrong.json()["message"]
    for token in (READ_TOKEN, TOKEN):  # the shared token is an admin's: it reads too
        async with client.stream("GET", path, headers=bearer(token)) as answer:
            assert answer.status_code == 200, path


async def test_the_stream_takes_the_read_token_as_a_query_parameter(guarded):
    """A browser's EventSource cannot send a header."""
    _, client = guarded
    async with client.stream("GET", STREAM_PATH, params={"access_token": READ_TOKEN}) as stream:
        assert stream.status_code == 200
    refused = await client.get(STREAM_PATH, params={"access_token": "wrong-0123456789abcd"})
    assert refused.status_code == 401
    assert (await client.get("/health")).status_code == 200  # liveness stays open


async def test_rbee_workers_sends_the_read_token(guarded, tmp_path):
    queen, _ = guarded
    token_file = tmp_path / "reader"
    token_file.write_text(READ_TOKEN)

    def rbee_workers(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([RBEE, "workers", "--queen", url_of(queen), *extra],
                              capture_output=True, text=True, timeout=30)

    listed = await trio.to_thread.run_sync(rbee_workers, "--read-token-file", str(token_file))
    assert listed.returncode == 0, listed.stderr
    assert "gpu-01" in listed.stdout
