"""``metrics/<stage>.json``: small, flat, numbers only, so ``dvc metrics diff`` reads well."""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

from postertune.atomic import write_json

METRICS_DIR = Path("metrics")


def flatten(values: dict, prefix: str = "") -> dict[str, float | int]:
    flat: dict[str, float | int] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"metric {name!r} is not a number: {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not finite: {value!r}")
        else:
            flat[name] = int(value) if isinstance(value, int) else float(value)
    return flat


def write_metrics(stage: str, values: dict, directory: Path = METRICS_DIR) -> Path:
    """Write ``values`` (nested one level at most for readability) for ``stage``."""
    flatten(values)  # validate: numbers only, finite
    path = Path(directory) / f"{stage}.json"
    write_json(path, values)
    return path
