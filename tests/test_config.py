"""YAML configuration: defaults, and errors that name the file, the key and the problem."""

from __future__ import annotations

import subprocess

import pytest

from rbee import ConfigError
from rbee.config import HiveConfig, QueenConfig, load_config, parse_config
from rbee.http.auth import read_token

from .daemons import BIN


def write(tmp_path, text: str):
    path = tmp_path / "hive.yaml"
    path.write_text(text)
    return path


def test_empty_file_is_the_default_config(tmp_path):
    config = load_config(write(tmp_path, ""), HiveConfig)
    assert config.port == 7835 and config.heartbeat.interval_s == 1.0
    assert config.cgroup.backend == "auto" and config.collect.gpu == "auto"


def test_values_are_read(tmp_path):
    config = load_config(write(tmp_path, """
id: gpu-07
heartbeat: {interval_s: 0.5}
workers:
  - {group: llm, instance: a, argv: [sleep, "9"], cpu_limit: 50%, memory_limit: 1G}
"""), HiveConfig)
    assert config.id == "gpu-07" and config.heartbeat.interval_s == 0.5
    assert config.workers[0].memory_limit == "1G"


@pytest.mark.parametrize("config_type, text, expected", [
    (HiveConfig, "port: seven", "hive.yaml: port: Expected `int`, got `str`"),
    (HiveConfig, "heartbeat: {interval_s: -1}", "heartbeat.interval_s: Expected `float` > 0.0"),
    (HiveConfig, "colect: {}", "hive.yaml: unknown field `colect`; did you mean `collect`?"),
    (HiveConfig, "cgroup: {backend: v3}", "cgroup.backend: Invalid enum value 'v3'"),
    (HiveConfig, "workers: [{group: llm}]", "Object missing required field `instance`"),
    (HiveConfig, "port: [1, 2", "not valid YAML"),
    (HiveConfig, "- a\n- b", "the top level must be a mapping"),
    (QueenConfig, "registry: {stale_after_s: 30, remove_after_s: 10}",
     "registry: remove_after_s (10) must be greater than stale_after_s (30)"),
    (QueenConfig, "stream: {client_buffer: 0}", "stream.client_buffer: Expected `int` >= 1"),
    (QueenConfig, "registry: {mass_silence_fraction: 1.5}",
     "registry.mass_silence_fraction: Expected `float` <= 1"),
    (QueenConfig, "http: {max_body_bytes: 10}", "http.max_body_bytes: Expected `int` >= 1024"),
    (QueenConfig, "stream: {queen_interval: 1}",
     "hive.yaml: stream: unknown field `queen_interval`; did you mean `queen_interval_s`?"),
    (QueenConfig, "registry: {store: {kind: redis}}",
     "registry.store: kind: redis needs url (redis://host:6379/0)"),
    (QueenConfig, "registry: {store: {kind: valkey, url: 'redis://r'}}",
     "registry.store.kind: Invalid enum value 'valkey'"),
    (QueenConfig, "registry: {store: {kind: redis, url: 'http://r:6379'}}",
     "registry.store: url 'http://r:6379': the scheme must be redis or rediss"),
    (QueenConfig, "registry: {store: {kind: redis, url: 'redis://r:6379/x'}}",
     "the path must be a database number, not 'x'"),
    (QueenConfig, "registry: {store: {kind: redis, url: 'redis://r:99999'}}",
     "registry.store: url 'redis://r:99999': Port out of range"),
    (QueenConfig, "registry: {store: {kind: redis, url: 'redis://:secret@r'}}",
     "credentials and options are not taken from the url"),
    (QueenConfig, "registry: {store: {url: 'redis://r'}}",
     "registry.store: url is for kind: redis; the memory store takes none"),
    (QueenConfig, "registry: {store: {key_prefix: 'a b'}}",
     "registry.store: key_prefix 'a b' must be 1-64 of"),
    (QueenConfig, "registry: {store: {lease_s: 0.1}}",
     "registry.store.lease_s: Expected `float` >= 0.3"),
    (QueenConfig, "stream: {replay_events: 0}", "stream.replay_events: Expected `int` >= 1"),
    (HiveConfig, "queen_url: []", "queen_url: the list names no queen"),
    (HiveConfig, "queen_url: ['http://a:1', 'http://a:1']", "queen_url: a queen is listed twice"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_bad_config_names_file_key_and_problem(tmp_path, config_type, text, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), config_type)
    assert expected in str(caught.value)
    assert str(tmp_path / "hive.yaml") in str(caught.value)


@pytest.mark.parametrize("config_type, text, expected", [
    (QueenConfig, "registy: {}", "hive.yaml: unknown field `registy`; did you mean `registry`?"),
    (QueenConfig, "registry: {store: {kind: redis, uri: 'redis://r'}}",
     "registry.store: unknown field `uri`; did you mean `url`?"),
    (HiveConfig, "collect: {engine: {timeot_s: 1}}",
     "collect.engine: unknown field `timeot_s`; did you mean `timeout_s`?"),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x], cpu_limt: 200%}]",
     "workers[0]: unknown field `cpu_limt`; did you mean `cpu_limit`?"),
    (HiveConfig, "heartbeat: {xyzzy: 1}",
     "heartbeat: unknown field `xyzzy`; the keys here are: backoff_initial_s, backoff_max_s,"),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x], cpu_limit: 2}]",
     'workers[0].cpu_limit: cpu_limit is a percentage string such as "200%" (got the number 2; '
     'for 2 cores write "200%")'),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x]}, "
                 "{group: a, instance: c, argv: [x], cpu_limit: 0.5}]",
     'workers[1].cpu_limit: cpu_limit is a percentage string such as "200%" (got the number 0.5; '
     'for 0.5 cores write "50%")'),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x], cpu_limit: [1]}]",
     'cpu_limit is a percentage string such as "200%" (got a list)'),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x], memory_limit: 4.5}]",
     'workers[0].memory_limit: memory_limit is a size string such as "4G" or "512M", or a whole '
     'number of bytes (got the number 4.5)'),
    (HiveConfig, "workers: [{group: a, instance: b, argv: [x], memory_limit: true}]",
     "(got the boolean true)"),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_bad_config_says_what_to_write(tmp_path, config_type, text, expected):
    """A typo gets the key it most likely meant, a limit of the wrong type the form it takes:
    msgspec's own words (``Expected `str | null`, got `int` ``) say neither."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), config_type)
    assert expected in str(caught.value)
    assert "Expected `" not in str(caught.value)


def test_the_hints_pass_when_the_value_is_right(tmp_path):
    text = ("workers: [{group: a, instance: b, argv: [x], cpu_limit: 200%, "
            "memory_limit: 4294967296}]")
    spec = load_config(write(tmp_path, text), HiveConfig).workers[0]
    assert (spec.cpu_limit, spec.memory_limit) == ("200%", 4294967296)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml", HiveConfig)


def test_queen_defaults(tmp_path):
    config = load_config(write(tmp_path, ""), QueenConfig)
    assert (config.bind, config.port) == ("127.0.0.1", 7833)
    assert config.stream.queen_interval_s == 2.5
    assert config.registry.stale_after_s < config.registry.remove_after_s


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read token file {path}: No such file or directory"),
    ("  \n", "token file {path} is empty"),
    ("short\n", "token in {path} is too short: 5 characters, at least 16"),
    ("two words of a shared secret\n", "token in {path} must be one word of printable ASCII"),
    ("t\u00f6ken-with-umlaut-0123456789", "token in {path} must be one word of printable ASCII"),
])
def test_bad_token_file_names_the_key_and_problem(tmp_path, content, problem):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        read_token(str(path), "queen.yaml")
    assert str(caught.value).startswith(
        f"queen.yaml: auth_token_file: {problem.format(path=path)}")


def test_token_file_is_read_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  s3cr3t-token-0123456789\n")
    assert read_token(str(path)) == "s3cr3t-token-0123456789"
    assert read_token(None) is None


def _hive_check(tmp_path, text: str, *options: str) -> subprocess.CompletedProcess:
    path = tmp_path / "hive.yaml"
    path.write_text(text)
    return subprocess.run([str(BIN / "rbee-hive"), "--config", str(path), *options],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text, problem", [
    ("log_dir: {tmp}/absent\n", "log_dir: {tmp}/absent does not exist"),
    ("log_dir: {tmp}/hive.yaml\n", "log_dir: {tmp}/hive.yaml is not a directory"),
    ("workers: [{group: llm, instance: a, argv: [x], cpu_limit: 12Q}]\n",
     "workers[0]: invalid CPU limit '12Q'"),
    ("workers: [{group: llm, instance: a, argv: [x], memory_limit: 4X}]\n",
     "workers[0]: invalid memory limit '4X'"),
    ("workers: [{group: llm, instance: a, argv: [x]}, {group: llm, instance: a, argv: [y]}]\n",
     "worker llm/a is listed twice"),
    ("workers: [{group: llm/x, instance: a, argv: [x]}]\n", "workers[0].group: Expected `str` "
                                                            "matching regex"),
    ("id: rack1/gpu-07\n", "id: Expected `str` matching regex"),
    ("bind: not an address\n", "bind 'not an address' is neither an IP address nor a host name"),
    ("port: 70000\n", "port: Expected `int` <= 65535"),
    ("auth_token_file: {tmp}/absent\n", "auth_token_file: cannot read token file"),
])
def test_rbee_hive_check_config_runs_every_start_up_check(tmp_path, text, problem):
    """``--check-config`` refuses what start-up would refuse (Ansible validates with it), with
    the file, key and problem named."""
    result = _hive_check(tmp_path, text.replace("{tmp}", str(tmp_path)), "--check-config")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"rbee-hive: {tmp_path}/hive.yaml: ")
    assert problem.replace("{tmp}", str(tmp_path)) in result.stderr


def test_rbee_hive_start_up_names_a_missing_log_dir(tmp_path):
    """Start-up runs the same checks: a missing log_dir is named as such (it was once reported as
    "cannot listen on 127.0.0.1:PORT: No such file or directory")."""
    result = _hive_check(tmp_path, f"port: 0\nlog_dir: {tmp_path}/absent\n")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"rbee-hive: {tmp_path}/hive.yaml: log_dir: "
                                     f"{tmp_path}/absent does not exist")


def test_bind_accepts_addresses_and_host_names():
    for bind in ("127.0.0.1", "::1", "0.0.0.0", "gpu-07.example.com", "localhost"):
        assert parse_config({"bind": bind}, QueenConfig).bind == bind
