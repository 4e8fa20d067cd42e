"""YAML <-> the schema: the typed walk (unknown keys, wrong types, value ranges), ``--set``
overrides, and plain data back out for YAML files and checkpoints."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from kdkit.config.lm_schema import LMModelConfig
from kdkit.config.schema import RunConfig, SourceConfig, StudentConfig, TeacherConfig
from kdkit.errors import KDError, closest_names

__all__ = ["build_section", "to_dict", "to_yaml", "read_yaml", "apply_overrides"]

# -- YAML -> dataclasses ----------------------------------------------------------------

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp in (int, float, str, bool):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false"}[
            tp.__name__
        ]
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ')}s"
    if dataclasses.is_dataclass(tp) or tp is Any or origin in (Mapping, dict):
        return "a mapping" if tp is not Any else "any value"
    return str(tp)


def _given(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong(key: str, tp: Any, value: Any, expected: str | None = None) -> KDError:
    return KDError(
        f"config key {key!r} expects {expected or _type_name(tp)}, got {_given(value)}"
        + (f" ({type(value).__name__})" if not isinstance(value, (str, int, float)) else "")
    )


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except KDError as err:
                if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                    raise err from None  # the inner key's message is the useful one
        raise _wrong(key, tp, value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = [str(c) for c in typing.get_args(tp)]
            close = closest_names(str(value), choices, 1) if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KDError(f"config key {key!r} expects one of {choices}, got {_given(value)}{hint}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _wrong(key, tp, value)
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{key}.{i}") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _wrong(key, tp, value)
        from kdkit.registry import check_plain

        check_plain(value, f"config key {key!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(key, tp, value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the schema


def yaml_key(f: dataclasses.Field) -> str:
    """A field's YAML key: its name, or ``metadata["key"]`` where the key is no Python name
    (``distill.on_policy.lambda`` is the field ``lam``)."""
    return f.metadata.get("key", f.name)


def _build(cls: type, data: Any, key: str) -> Any:
    if isinstance(data, str) and cls in (TeacherConfig, StudentConfig, LMModelConfig):
        data = {"model": data}  # shorthand: `teacher: torchvision:resnet50`
    if not isinstance(data, Mapping):
        where = f"config key {key!r}" if key else "the config"
        raise KDError(f"{where} expects a mapping, got {_given(data)}")
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            full = f"{key}.{name}" if key else str(name)
            close = difflib.get_close_matches(str(name), list(fields), 2, 0.75)
            close = close or closest_names(str(name), list(fields), 1)
            raise KDError(
                f"unknown config key {full!r}; did you mean "
                f"{' or '.join(repr(f'{key}.{c}' if key else c) for c in close)}?"
            )
    values = {}
    for name, f in fields.items():
        full = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise KDError(f"config key {full!r} is required ({_type_name(hints[f.name])})")
            continue
        value = _convert(hints[f.name], data[name], full)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise _wrong(full, hints[f.name], data[name], f.metadata["expected"])
        values[f.name] = value
    return cls(**values)


def build_section(cls: type, data: Any, key: str) -> Any:
    """One section (e.g. :class:`TeacherConfig` from a checkpoint's ``teacher_spec``), with
    the same messages as a whole config; ``key`` prefixes them (``"teacher"``)."""
    return _build(cls, data, key)


# -- dataclasses -> YAML ----------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML/JSON and checkpoints."""
    if isinstance(obj, SourceConfig):  # only the key that is set: {image_folder: data/train}
        return {
            f.name: v for f in dataclasses.fields(obj) if (v := getattr(obj, f.name)) is not None
        }
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


#: a config is a page of keys: far larger files are refused before they are parsed
MAX_YAML_BYTES = 1 << 20
#: nodes after expanding aliases (a 1 KB "billion laughs" file expands to 10**9)
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's C parser where installed


def _check_graph(root: Any, where: str) -> None:
    """Count the nodes of a composed document with aliases expanded (memoized, so the count
    itself is linear), refuse recursive aliases, deep nesting and duplicate mapping keys."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Any, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise KDError(f"{where}: a recursive alias (an anchor used inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise KDError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if k.value in seen:
                        raise KDError(
                            f"{where}: duplicate key {k.value!r} (line {line}, first on line "
                            f"{seen[k.value]}); keep one"
                        )
                    seen[k.value] = line
                total += size(k, depth + 1) + size(v, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v, depth + 1) for v in node.value)
        busy.discard(key)
        if total > MAX_YAML_NODES:
            raise KDError(
                f"{where}: more than {MAX_YAML_NODES} values once its aliases are expanded "
                "(an alias bomb?); write the config out plainly"
            )
        sizes[key] = total
        return total

    size(root, 0)


def load_yaml_text(text: str, where: str = "the YAML") -> Any:
    """Safe-load YAML with limits: size, nodes after alias expansion, depth, no duplicate
    keys (a second ``train:`` section would silently replace the first)."""
    if len(text) > MAX_YAML_BYTES:
        raise KDError(f"{where} is {len(text):,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> Any:
    """Safe-load a YAML file; a missing file or a syntax error is one KDError line."""
    path = Path(path)
    if not path.is_file():
        raise KDError(f"no config file at {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise KDError(
            f"{path} is {path.stat().st_size:,} bytes; a config is at most {MAX_YAML_BYTES:,}"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise KDError(
            f"{path} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}, line "
            f"{line}); save the config as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    try:
        return load_yaml_text(text, str(path))
    except RecursionError:
        raise KDError(f"{path}: nested too deeply to be a config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise KDError(f"{path} is not valid YAML{where}: {problem}") from None


# -- overrides ----------------------------------------------------------------------------


def apply_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """Apply ``a.b.0.c=VALUE`` strings to parsed YAML (the value is parsed as YAML too).

    Missing mapping keys are created, so the schema (not this function) reports a typo with
    "did you mean"; list positions must exist.
    """
    data = {} if data is None else data
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise KDError(f"--set expects KEY=VALUE (e.g. train.epochs=1), got {item!r}")
        try:
            value = load_yaml_text(raw, f"--set {dotted}") if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        parts = dotted.split(".")
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise KDError(
                        f"--set {dotted}: {where!r} needs a list position 0..{len(node) - 1}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {} if node.get(part) is None else node[part]
                    if not isinstance(node[part], (dict, list)):
                        raise KDError(f"--set {dotted}: {where!r} is {node[part]!r}, not a mapping")
                    node = node[part]
            else:
                raise KDError(f"--set {dotted}: cannot index into {node!r}")
    return data
