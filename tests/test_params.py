"""The params loader: one line naming the file or the dotted key, whatever is wrong with params.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest

from postertune.errors import PipelineError
from postertune.params import SHOWN_CHARS, Bounds, Invalid, MultipleOf, NotEmpty, ParamError, build, section


@dataclass(frozen=True)
class Inner:
    steps: Annotated[int, Bounds(ge=1)] = 4


@dataclass(frozen=True)
class Example:
    rate: Annotated[float, Bounds(gt=0, lt=1)] = 0.5
    side: Annotated[int, Bounds(ge=8), MultipleOf(8)] = 64
    names: Annotated[list[str], NotEmpty()] = ("a",)
    timesteps: list[Annotated[int, Bounds(ge=0, lt=1000)]] = (100,)
    title: str = "poster"
    inner: Inner = Inner()

    def __post_init__(self) -> None:
        if self.side < 16 and self.rate > 0.9:
            raise Invalid("side", "must be at least 16 when rate is above 0.9")


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("values", "name", "problem"),
    [
        ({"rate": 0}, "stage.rate", "must be above 0 and below 1, got 0.0"),
        ({"rate": 1.5}, "stage.rate", "must be above 0 and below 1, got 1.5"),
        ({"side": 4}, "stage.side", "must be at least 8, got 4"),
        ({"side": 20}, "stage.side", "must be a multiple of 8, got 20"),
        ({"names": []}, "stage.names", "must not be empty"),
        ({"timesteps": [5, 1000]}, "stage.timesteps[1]", "must be at least 0 and below 1000, got 1000"),
        ({"inner": {"steps": 0}}, "stage.inner.steps", "must be at least 1, got 0"),
        ({"side": 8, "rate": 0.95}, "stage.side", "must be at least 16 when rate is above 0.9"),
        ({"rate": float("nan")}, "stage.rate", "must be a finite number, got nan"),
        ({"rate": float("inf")}, "stage.rate", "must be a finite number, got inf"),
    ],
)
def test_declared_bounds_and_own_checks_name_the_dotted_key(values, name, problem):
    with pytest.raises(ParamError) as caught:
        build(Example, values, "stage")
    assert caught.value.name == name
    assert str(caught.value) == f"param {name}: {problem}"


def test_values_at_their_bounds_pass():
    params = build(Example, {"rate": 0.999, "side": 16, "names": ["x"], "timesteps": [0, 999]}, "stage")
    assert (params.side, params.timesteps) == (16, [0, 999])


def test_nan_and_infinity_in_yaml_are_refused(tmp_path):
    for text in ("stage:\n  rate: .nan\n", "stage:\n  rate: .inf\n", "stage:\n  rate: -.inf\n"):
        with pytest.raises(ParamError, match=r"^param stage.rate: must be a finite number"):
            section(Example, "stage", write(tmp_path, text))


def test_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = write(tmp_path, b"stage:\n  title: caf\xe9\n")
    with pytest.raises(PipelineError) as caught:
        section(Example, "stage", path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 19)"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("stage:\n  rate: 0.5\n  side: 16\n  rate: 0.25\n", 4),  # a key twice: YAML keeps the last, silently
        ("stage:\n  rate: 0.5\nother: {}\nstage:\n  rate: 0.25\n", 4),  # a section twice
    ],
)
def test_a_key_given_twice_is_refused_with_its_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as caught:
        section(Example, "stage", path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML: ") and f"given twice (line {line})" in message
    assert "\n" not in message


def test_a_huge_value_is_cut_in_the_message(tmp_path):
    """A YAML alias bomb expands to millions of items: the error stays one short line."""
    levels = ["a: &a ['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x']"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(7)]
    path = write(tmp_path, "\n".join(levels) + "\nstage:\n  title: *h\n")
    with pytest.raises(ParamError) as caught:
        section(Example, "stage", path)
    message = str(caught.value)
    assert message.startswith("param stage.title: expected a string, got [[[[")
    assert len(message) < SHOWN_CHARS + 100 and "characters)" in message


def test_unknown_key_names_the_known_ones(tmp_path):
    with pytest.raises(ParamError) as caught:
        section(Example, "stage", write(tmp_path, "stage:\n  rates: 0.1\n"))
    assert caught.value.name == "stage.rates"
    assert "unknown parameter (known: inner, names, rate, side, timesteps, title)" in str(caught.value)
