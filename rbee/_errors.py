"""The exceptions rbee raises, rooted in one base class so callers can catch all of ours at once.

    RbeeError
    ├── ConfigError        bad YAML, a bad key or value (names file, key and problem)
    ├── ContractError      a payload that does not match the telemetry contract
    ├── SpawnError         a worker could not be started (nothing is left behind)
    │   ├── LimitError     a CPU or memory limit that cannot be understood
    │   └── WorkerExistsError  a worker of that group and instance is already kept
    ├── CgroupError        the cgroup tree cannot be used (permission, missing controller)
    ├── CollectorError     a collector plugin failed (recorded per worker, never fatal)
    ├── ListenError        a server cannot listen on its address (taken, not ours, unresolvable)
    ├── PluginError        a plugin rbee refuses to register (a hook wrapper, a bad hook)
    ├── NotFoundError      no such group, instance or hive
    └── AdmissionError     the queen will not take a new hive now (registry full, or too many
                           new hives at once; ``retry_after_s`` says when to try again)

Context goes in keyword attributes as well as the message, so that programs need not parse text.
"""

from __future__ import annotations


class RbeeError(Exception):
    """Base class of every error rbee raises on purpose."""


class ConfigError(RbeeError):
    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


class ContractError(RbeeError):
    """A message that is not valid JSON or does not match the telemetry structs."""


class SpawnError(RbeeError):
    def __init__(self, message: str, *, group: str = "", instance: str = "") -> None:
        super().__init__(message)
        self.group = group
        self.instance = instance


class WorkerExistsError(SpawnError):
    """A worker of that group and instance is already kept by this hive."""


class LimitError(SpawnError):
    """A limit string such as ``"0%"`` or ``"12Q"`` that cannot become a cgroup setting."""


class CgroupError(RbeeError):
    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CollectorError(RbeeError):
    def __init__(self, message: str, *, collector: str = "") -> None:
        super().__init__(message)
        self.collector = collector


class ListenError(RbeeError):
    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class PluginError(RbeeError):
    def __init__(self, message: str, *, plugin: str = "", hook: str = "") -> None:
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class StoreError(RbeeError):
    """The queen's shared store (Redis) cannot be reached or refused a command."""


class NotFoundError(RbeeError):
    """Asked for a group, instance or hive that does not exist."""


class AdmissionError(RbeeError):
    """A hive the queen does not know yet was not admitted. ``retry_after_s`` is when a new hive
    may be admitted again (rate limit), or None while the registry is full (``max_hives``)."""

    def __init__(self, message: str, *, hive_id: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.hive_id = hive_id
        self.retry_after_s = retry_after_s


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as trio's nurseries raise them."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]
