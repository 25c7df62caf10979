"""Typed params: ``params.yaml`` sections become frozen dataclasses, checked on load.

Every error names the full dotted parameter (``filter.min_side``), so a typo in
``dvc exp run -S`` fails at once with one line, before any data or model is touched.
Ranges are declared on the fields (``Annotated[int, Bounds(ge=1)]``) and checked here;
checks that relate several fields live in a dataclass's ``__post_init__``, which raises
``Invalid`` with the field's own name. This module imports no model library, so loading
params takes well under a second.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from postertune.errors import PipelineError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
Precision = Literal["float", "fp16", "bf16"]  # how weights are saved or run; dtypes: models/precision.py


SHOWN_CHARS = 80  # a value quoted in an error is cut to this many characters


class ParamError(PipelineError):
    def __init__(self, name: str, problem: str):
        super().__init__(f"param {name}: {problem}")
        self.name = name


class Invalid(ValueError):
    """Raised by a params dataclass's own checks with the field's name; the loader adds the section's."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a number param: ``Annotated[float, Bounds(ge=0, le=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        limits = [
            (self.ge, value >= self.ge if self.ge is not None else True, "at least"),
            (self.gt, value > self.gt if self.gt is not None else True, "above"),
            (self.le, value <= self.le if self.le is not None else True, "at most"),
            (self.lt, value < self.lt if self.lt is not None else True, "below"),
        ]
        if all(ok for _, ok, _ in limits):
            return None
        if (self.ge, self.gt, self.le, self.lt) == (0, None, None, None):
            return f"must not be negative, got {shown(value)}"
        if (self.ge, self.gt, self.le, self.lt) == (None, 0, None, None):
            return f"must be positive, got {shown(value)}"
        wanted = " and ".join(f"{words} {limit:g}" for limit, _, words in limits if limit is not None)
        return f"must be {wanted}, got {shown(value)}"


@dataclasses.dataclass(frozen=True)
class MultipleOf:
    step: int

    def problem(self, value: int) -> str | None:
        return None if value % self.step == 0 else f"must be a multiple of {self.step}, got {value}"


@dataclasses.dataclass(frozen=True)
class NotEmpty:
    def problem(self, value: Any) -> str | None:
        return None if len(value) else "must not be empty"


@dataclasses.dataclass(frozen=True)
class Length:
    items: int

    def problem(self, value: Any) -> str | None:
        return None if len(value) == self.items else f"must have {self.items} items, got {shown(list(value))}"


# An RGB colour, three integers 0-255: ``background: [255, 255, 255]``.
Colour = Annotated[tuple[Annotated[int, Bounds(ge=0, le=255)], ...], Length(3)]


def shown(value: Any) -> str:
    """``repr(value)``, cut short: an error stays one readable line whatever the value."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} given twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {str(exc).splitlines()[-1].strip()}") from None
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
        raise ParamError(name, f"expected a mapping, got {shown(data)}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ParamError(
            f"{name}.{unknown[0][:SHOWN_CHARS]}", f"unknown parameter (known: {', '.join(sorted(fields))})"
        )
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
    except Invalid as exc:
        raise ParamError(f"{name}.{exc.key}", exc.problem) from None
    except (TypeError, ValueError) as exc:
        raise ParamError(name, str(exc)) from None


def _convert(hint: Any, value: Any, name: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Annotated:
        converted = _convert(args[0], value, name)
        for check in args[1:]:
            problem = check.problem(converted)
            if problem:
                raise ParamError(name, problem)
        return converted
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # an optional value: its own type's problem says more than "does not fit"
            return _convert(options[0], value, name)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, name)
            except ParamError as exc:
                errors.append(str(exc))
        raise ParamError(name, f"{shown(value)} does not fit {_describe(hint)}")
    if origin is Literal:
        if value not in args:
            raise ParamError(name, f"{shown(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(name, f"expected a list, got {shown(value)}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(name, f"expected a mapping, got {shown(value)}")
        val_t = args[1] if args else Any
        return {k: _convert(val_t, v, f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(name, f"expected true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(name, f"expected an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(name, f"expected a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ParamError(name, f"must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(name, f"expected a string, got {shown(value)}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ParamError(name, f"expected a path, got {shown(value)}")
        return Path(value)
    raise TypeError(f"unsupported param type {hint!r} for {name}")


def _describe(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", repr(a)) for a in get_args(hint))
