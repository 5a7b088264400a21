"""The validation engine: params values checked against their dataclass types, and the YAML reader.

`build` makes a frozen dataclass from a mapping, refusing unknown and missing keys, wrong types, enum values and
ranges (field metadata `minimum`/`maximum`, from `rng`), and turns the dataclass's own `__post_init__` errors into
`ParamsError`s; every message names `file:key`, the value and what is allowed. No section lives here: the sections
are in the modules beside it, one per job of the pipeline, so a stage imports only the sections it reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[3]


class ParamsError(ValueError):
    """A params file failed validation; the message names file:key, the value and what is allowed."""


def check_sha256_param(key: str, value: str | None) -> None:
    """A pinned sha256 in params: null or 64 lower-case hex digits (restok.weights.verify_pinned checks files)."""
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise ValueError(f"{key}={value!r}: must be null or a sha256 (64 lower-case hex digits)")


def rng(minimum=None, maximum=None, help: str = "") -> dict:
    """Field metadata: numeric bounds (inclusive) and a description, used by validation and the schema."""
    return {"minimum": minimum, "maximum": maximum, "help": help}


def without(cls, *names: str):
    """A params-section dataclass with the fields of model config `cls` except `names` (filled from artifacts)."""
    hints = typing.get_type_hints(cls)
    fs = [
        (f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(cls)
        if f.name not in names
    ]
    out = dataclasses.make_dataclass(f"{cls.__name__}Params", fs, frozen=True)
    out.__doc__ = f"{cls.__name__} fields; {', '.join(names)} come from upstream artifacts."
    return out


def cli_value(text: str):
    """A params value as written on a command line (`key=value`): YAML, except that 3e-3 is a number (YAML 1.1,
    which PyYAML reads, wants 3.0e-3)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(tree: dict, key: str, value, where: str = "") -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c"; refuses keys that do not exist."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise ParamsError(f"{where}{key}: no such params key")
        node = node[part]
    if leaf not in node:
        raise ParamsError(f"{where}{key}: no such params key")
    node[leaf] = value


def deep_merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = deep_merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def convert(tp, value, where: str):
    """Check `value` against type `tp`; returns the converted value or raises ParamsError."""
    origin = typing.get_origin(tp)
    bad = ParamsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return convert(arg, value, where)
            except ParamsError:
                continue
        raise bad
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        val_tp = typing.get_args(tp)[1]
        return {k: convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (arg, *rest) = typing.get_args(tp)
        items = [convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # YAML .nan / .inf: no range check can hold them (nan < lo is False)
            raise ParamsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        raise bad
    return value


def build(cls, data, where: str):
    """Build dataclass `cls` from a mapping, refusing unknown and missing keys. `where` prefixes messages."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(set(fields) - set(data))
    if missing:
        raise ParamsError(f"{where}: missing key(s) {missing} (every value lives in params.yaml)")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        value = convert(hints[name], data[name], key)
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ParamsError(f"{key}: {value!r} is out of range [{lo}, {hi}]")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ParamsError(f"{where.split(':')[0]}: {e}") from None


@dataclass(frozen=True)
class Params:
    """The validated sections a stage asked for; attribute access by section name."""

    path: str
    sections: dict[str, Any]

    def __getattr__(self, name):
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(
                f"section {name!r} was not declared by this stage (declared: "
                f"{sorted(self.sections)}); add it to the stage's PARAMS and dvc.yaml"
            ) from None


def _refuse_duplicate_keys(node, path: Path, where: str = "") -> None:
    """A mapping that repeats a key: YAML keeps the last value and drops the first without a word, so a params
    file with one is refused, naming the dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        lines = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in lines:
                raise ParamsError(
                    f"{path}:{where}{key}: duplicate key (lines {lines[key]} and {line}); YAML would "
                    f"keep only the last value: remove one"
                )
            lines[key] = line
            _refuse_duplicate_keys(value_node, path, f"{where}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{where.removesuffix('.')}[{i}].")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        text = path.read_text()
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data
