"""Reading a config file: YAML into the structs of ``rbee/config.py``, and msgspec's validation
errors said in the words of the person who wrote the YAML.

msgspec reports what the decoder saw (``Object contains unknown field `registy` ``, ``Expected
`str | null`, got `int` ``). Whoever wrote the YAML needs what to write instead: the key they
probably meant (difflib over the fields of the struct at that path, since a typo must stay an
error rather than fall back to a default), and for the limits, the form a limit takes. The key
path stays msgspec's (``workers[0].cpu_limit``), so ``--check-config`` and the daemons point
at the same line.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TypeVar

import msgspec
import yaml

from ._errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=msgspec.Struct)

_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_WRONG_TYPE = re.compile(r"^Expected `[^`]*`, got `(?P<got>[^`]*)`$")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")

RETIRED_KEYS = {
    "history.max_series": "history.max_series is no longer used: history is bounded in bytes by "
                          "history.max_bytes (a series costs about 6.1 KB at the default tiers)",
}
"""Keys of earlier releases, and what replaced them: refused with this message (rather than a
"did you mean" a retired key would get wrong)."""

_LIMIT_FORMS = {
    "cpu_limit": 'a percentage string such as "200%"',
    "memory_limit": 'a size string such as "4G" or "512M", or a whole number of bytes',
}


def parse_config(data: object, config_type: type[ConfigT], source: str = "<config>") -> ConfigT:
    """Validate already-parsed YAML data; errors name the source and the key path."""
    if data is None:
        data = {}
    try:
        return msgspec.convert(data, config_type, strict=False)
    except msgspec.ValidationError as exc:
        message, at, path = str(exc).rpartition(" - at `")
        if not at:  # the top level's own check (__post_init__): its message names the key
            message, path = str(exc), ""
        # what to write instead: the key meant ("did you mean"), the form of a limit
        message, key = _explain(message or str(exc), path.rstrip("`"), data, config_type)
        raise ConfigError(message, source=source, key=key) from exc


def load_config(path: str | Path, config_type: type[ConfigT]) -> ConfigT:
    """Read and validate a YAML file. Raises ConfigError naming the file, key and problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", source=source) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys to values", source=source)
    return parse_config(data, config_type, source)


def _explain(message: str, path: str, data: object, config_type: type) -> tuple[str, str]:
    """``(message, key)`` for msgspec's ``message`` at ``path`` (``$.workers[0].cpu_limit``, or
    ``""`` for the top level's own checks) in ``data``, the YAML as parsed."""
    parts = _parts(path)
    key = _key(parts)
    unknown = _UNKNOWN.match(message)
    if unknown and _key([*parts, unknown["name"]]) in RETIRED_KEYS:
        return RETIRED_KEYS[_key([*parts, unknown["name"]])], key
    if unknown:
        return _unknown_field(unknown["name"], parts, config_type), key
    wrong = _WRONG_TYPE.match(message)
    if wrong and parts and parts[-1] in _LIMIT_FORMS:
        return _limit_type(str(parts[-1]), _value_at(data, parts)), key
    return message, key


def _parts(path: str) -> list[str | int]:
    """``$.workers[0].cpu_limit`` as ``["workers", 0, "cpu_limit"]``."""
    return [int(index) if index else name
            for name, index in _PATH_PART.findall(path.removeprefix("$"))]


def _key(parts: list[str | int]) -> str:
    key = ""
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else f".{part}"
    return key.lstrip(".")


def _unknown_field(name: str, parts: list[str | int], config_type: type) -> str:
    fields = _fields_at(config_type, parts)
    said = f"unknown field `{name}`"
    if not fields:
        return said
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"{said}; did you mean `{close[0]}`?"
    return f"{said}; the keys here are: {', '.join(sorted(fields))}"


def _fields_at(config_type: type, parts: list[str | int]) -> list[str]:
    """The field names of the struct found by following ``parts`` from ``config_type``."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(config_type)
    for part in parts:
        info = _unwrap(info)
        if isinstance(part, int) and isinstance(info, msgspec.inspect.ListType):
            info = info.item_type
        elif isinstance(part, str) and isinstance(info, msgspec.inspect.StructType):
            match = [field.type for field in info.fields if field.encode_name == part]
            if not match:
                return []
            info = match[0]
        else:
            return []
    info = _unwrap(info)
    if not isinstance(info, msgspec.inspect.StructType):
        return []
    return [field.encode_name for field in info.fields]


def _unwrap(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The struct or list inside ``T | None`` (the only unions a config section sits in)."""
    if isinstance(info, msgspec.inspect.UnionType):
        inner = [t for t in info.types
                 if isinstance(t, (msgspec.inspect.StructType, msgspec.inspect.ListType))]
        if len(inner) == 1:
            return inner[0]
    return info


def _limit_type(name: str, value: object) -> str:
    form = _LIMIT_FORMS[name]
    hint = ""
    if name == "cpu_limit" and isinstance(value, (int, float)) and not isinstance(value, bool):
        hint = f'; for {value:g} cores write "{value * 100:g}%"'
    return f"{name} is {form} (got {_described(value)}{hint})"


def _described(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value:g}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def _value_at(data: object, parts: list[str | int]) -> object:
    for part in parts:
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return data
