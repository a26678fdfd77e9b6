"""Reading a Config: YAML files (with `extends:`), dotted command-line overrides, type checking against the
schema, relative path resolution, and writing the resolved YAML."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dsee_dist.config.schema import Config
from dsee_dist.config.validation import validate as validate_config
from dsee_dist.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checking and unknown-key errors.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is typing.Literal:  # the choice itself is checked by validation, with the other problems
        return _coerce(value, type(args[0]), key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return build_section(tp, value, key + ".")
    if origin is list or tp is list:
        if isinstance(value, str):  # allow `dsee.target_modules=c_attn,c_proj` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, key) for v in value] if inner is not Any else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    return value


def build_section(cls: type, data: dict, prefix: str = "") -> Any:
    """An instance of the schema dataclass `cls` from a mapping; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    public = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(public))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: " + ", ".join(prefix + k for k in public)
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML files and overrides.


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 integers, which YAML 1.2 dropped: `pattern: 2:4`
    (prune.pattern) stays the string '2:4' instead of the number 124 (2 x 60 + 4)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 ds.zero_optimization.stage=3` -> nested dict; `ds.` keys go under deepspeed.overrides."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.max_steps=20)")
        key, raw = item.split("=", 1)
        value = load_yaml(raw) if raw != "" else ""
        if key.startswith("ds."):
            _set_dotted(tree, "deepspeed.overrides." + key[3:], value)
        else:
            _set_dotted(tree, key, value)
    return tree


def merge_nested(base: dict, extra: dict) -> dict:
    """`extra` merged over `base`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def resolve_extends(path: Path, data: dict, seen: tuple = ()) -> dict:
    """`extends: other.yaml` (relative to this file): this file's sections merged over that one's."""
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.resolve().parent / str(parent)).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise ConfigError(f"config file '{path}' extends itself through '{parent}'; remove the cycle")
    if not parent_path.is_file():
        raise ConfigError(f"config file '{path}' extends '{parent}', which does not exist next to it")
    base = load_yaml(parent_path.read_text()) or {}
    base = resolve_extends(parent_path, base, seen + (path.resolve(),))
    return merge_nested(base, data)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist; pass an existing YAML, e.g. --config configs/quickstart.yaml"
        )
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, dsee:, ...)")
    return resolve_extends(path, data)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment config, apply dotted overrides, validate. Raises ConfigError."""
    data: dict = {}
    source_dir = ""
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        source_dir = str(path.resolve().parent)
    data = merge_nested(data, parse_overrides(list(overrides)))
    cfg = build_section(Config, data)
    cfg.source_dir = source_dir
    validate_config(cfg)
    return cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    """A Config from a resolved dict (e.g. a checkpoint's). `validate=False` skips the checks, for configs
    recorded on another machine."""
    cfg = build_section(Config, data)
    if validate:
        validate_config(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run writes to output.dir/config.resolved.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
