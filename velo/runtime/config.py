"""Daemon configuration: one TOML file per daemon, every key overridable by environment.

Each daemon describes its configuration as nested dataclasses with defaults. `load_config`
reads the TOML file, applies environment overrides and validates the result, failing fast
with a `ConfigError` that names the bad key.

Environment overrides use the daemon's prefix and a double underscore between nested keys,
e.g. ``VELO_EDGED__CACHE__TOP_P=5`` sets ``[cache] top_p = 5`` of edged.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a daemon's configuration: nested dataclasses


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


def load_config(cls: type[T], path: str | Path | None, env_prefix: str) -> T:
    """Build `cls` from the TOML file at `path` (optional) and the environment.

    Precedence: dataclass defaults < file < environment.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not is_file(path):
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError, a 5000-digit int
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _apply_env(cls, data, env_prefix, os.environ)
    return _build(cls, data, "")


def _apply_env(cls: type, data: dict[str, Any], prefix: str,
               environ: typing.Mapping[str, str]) -> None:
    marker = prefix + "__"
    for name, raw in environ.items():
        if not name.startswith(marker):
            continue
        keys = [k.lower() for k in name[len(marker) :].split("__")]
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: '{key}' is not a section")
        target[keys[-1]] = _EnvValue(raw, name)


@dataclasses.dataclass(frozen=True)
class _EnvValue:
    """A string from the environment, converted to the field's type when building."""

    raw: str
    source: str


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where.rstrip('.')}' must be a table/section")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{where}{key}'{hint}; known keys here: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise ConfigError(f"config key '{where}{exc.key}' {exc.message}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        # a dataclass type from get_type_hints (Any), narrowed by is_dataclass
        return _build(typing.cast("type[DataclassInstance]", tp), value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, _EnvValue) and value.raw == "":
            return None
        if value is None:
            return None
        return _convert(args[0], value, key)
    if isinstance(value, _EnvValue):
        return _from_env(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (str,)
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}' is too large a number") from None
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {_quote(value)}")
    return value


def _quote(value: Any) -> str:
    """A value for an error message, cut short: a config value can be any size."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def is_file(path: str | Path) -> bool:
    """Path.is_file() that says False instead of raising (a 5000-character path raises)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _from_env(tp: Any, value: _EnvValue, key: str) -> Any:
    raw = value.raw.strip()
    try:
        if tp is bool:
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if tp in (int, float, str):
            return tp(raw)
        if typing.get_origin(tp) in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            parts = [p.strip() for p in raw.split(",") if p.strip()]
            items = [_from_env(item_tp, _EnvValue(p, value.source), key) for p in parts]
            return tuple(items) if typing.get_origin(tp) is tuple else items
    except (ValueError, OverflowError):
        pass
    else:
        return raw
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{value.source} (config key '{key}') must be {name}, got {_quote(raw)}")


class _FieldError(ConfigError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}' {message}")
        self.key, self.message = key, message


def require(condition: bool, key: str, message: str) -> None:
    """In a config dataclass's __post_init__: fail, naming `key`, unless `condition` holds.

    `key` is the field name; the loader prefixes its section.
    """
    if not condition:
        raise _FieldError(key, message)
