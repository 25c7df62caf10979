"""Typed params: ``params.yaml`` sections become frozen dataclasses, checked on load.

Every error names the full dotted parameter (``filter.min_side``), so a typo in
``dvc exp run -S`` fails at once with one line, before any data or model is touched.
Dataclasses may validate further in ``__post_init__`` by raising ``ParamError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from postertune.errors import PipelineError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


class ParamError(PipelineError):
    def __init__(self, name: str, problem: str):
        super().__init__(f"param {name}: {problem}")
        self.name = name


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of stage sections")
    return data


def section(cls: type[T], name: str, path: Path = PARAMS_FILE) -> T:
    """Read ``params.yaml`` section ``name`` as an instance of dataclass ``cls``."""
    data = load_params(path)
    if name not in data:
        raise ParamError(name, f"section missing from {path}")
    return build(cls, data[name], name)


def build(cls: type[T], data: Any, name: str) -> T:
    if not isinstance(data, dict):
        raise ParamError(name, f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamError(f"{name}.{unknown[0]}", f"unknown parameter (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, field in fields.items():
        if key in data:
            kwargs[key] = _convert(hints[key], data[key], f"{name}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamError(f"{name}.{key}", "required but missing")
    try:
        return cls(**kwargs)
    except ParamError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParamError(name, str(exc)) from None


def _convert(hint: Any, value: Any, name: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, name)
            except ParamError as exc:
                errors.append(str(exc))
        raise ParamError(name, f"{value!r} does not fit {_describe(hint)}")
    if origin is Literal:
        if value not in args:
            raise ParamError(name, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(name, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(name, f"expected a mapping, got {value!r}")
        val_t = args[1] if args else Any
        return {k: _convert(val_t, v, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(name, f"expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ParamError(name, f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported param type {hint!r} for {name}")


def _describe(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", repr(a)) for a in get_args(hint))
