"""Typed job configs: dataclass sections, `key=value` overrides, validation, YAML next to the run.

A job config is a dataclass whose fields are dataclass sections (torchtitan's JobConfig shape):

    @dataclass
    class OptimConfig:
        lr: float = 1e-4
        def validate(self): ...

    @dataclass
    class PretrainConfig:
        optim: OptimConfig = field(default_factory=OptimConfig)

    cfg = apply_overrides(PretrainConfig(), ["optim.lr=3e-4"])

Overrides are parsed as YAML scalars/lists and converted to the field's annotated type, so `optim.lr=3e-4`,
`model.depths=[3,3,4,4,5]` and `train.compile=true` all work. Unknown keys and values of the wrong type are
errors that name the key and suggest the closest valid one. `validate()` of every section (if defined) runs
after overrides; it raises ConfigError with what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from phileo.fsutil import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid job configuration; the message says which key and what to do."""

    retryable = False  # running the same job again cannot help (phileo.launch.failover)


def _fields(cls_or_obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_obj)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}.{hint} Valid keys: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts a parsed value to the annotated type `tp`, or raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            raise ConfigError(f"config key '{key}' must be a string, got null")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Builds dataclass `cls` from a (nested) mapping; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise _unknown(f"{where}.{k}" if where != "config" else k, fields, where)
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-able data (Paths become strings, tuples lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', parsed value). Values are YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
    key, _, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it wants 1.0e-4): leave the conversion to the field's type.
    return key, value


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Sets dotted `key` on a nested dataclass config, converting `value` to the field's type."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            raise _unknown(key, fields, where)
        if i == len(parts) - 1:
            tp = _hints(type(obj))[part]
            setattr(obj, part, _coerce(value, tp, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")


def apply_overrides(cfg: T, overrides: Iterable[str] | Mapping[str, Any] = ()) -> T:
    """Returns a copy of `cfg` with `key=value` overrides (or a {dotted_key: value} mapping) applied and validated."""
    cfg = copy_config(cfg)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for k, v in items:
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def copy_config(cfg: T) -> T:
    return from_dict(type(cfg), to_dict(cfg))


def validate(cfg: Any) -> None:
    """Runs `validate()` on every section (depth first) and on the config itself."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v)
    if hasattr(cfg, "validate"):
        cfg.validate()


def save_config(cfg: Any, path: str | Path) -> Path:
    """Writes the config as YAML atomically (next to the run's outputs)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml_mapping(path: str | Path, what: str = "config file",
                      error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Reads a YAML file that must hold a mapping (an empty file is {}); raises `error` naming the file when it
    is missing, not YAML, or not a mapping."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {p} must be a mapping (key: value lines), not a {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Reads a YAML config written by save_config (or by hand), applies overrides, validates."""
    p = Path(path)
    data = read_yaml_mapping(p)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return apply_overrides(cfg, overrides)
