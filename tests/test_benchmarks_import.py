"""Every benchmark still imports against the code it measures: a renamed helper fails here,
not when someone sits down to measure."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", [b for b in BENCHMARKS if b != "__init__"])
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py: say what it measures and how to run it"
