"""The guide's quality filter over the deduplicated image table.

Rules, checked in this fixed order; a dropped image's ``filter_reason`` is the first it
fails and ``filter_reasons`` lists every rule it fails:

1. ``format``            its format (as decoded, not as named) is not in ``allowed_formats``
2. ``too_small``         a side is shorter than ``min_side``
3. ``too_large``         a side is longer than ``max_side``
4. ``aspect``            width / height is outside ``min_aspect`` ... ``max_aspect``
5. ``low_kb_per_pixel``  file size in KB (1024 bytes) / (width x height) is below ``min_kb_per_pixel``
6. ``low_dpi``           its dpi is below ``min_dpi``
7. ``missing_dpi``       it has no dpi metadata and ``missing_dpi`` is ``drop``

All bounds are inclusive. Web images often carry no dpi at all, so ``missing_dpi``
decides whether that counts against them; they are counted either way.

The guide's KB/pixel floor (0.0005) was set against PNG outputs of SD (0.0011-0.0015);
typical JPEG web posters score below it, so a JPEG source may want a lower floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from postertune.atomic import write_parquet
from postertune.errors import PipelineError
from postertune.filter.params import FilterParams
from postertune.tables import read_stage_table

RULES = ("format", "too_small", "too_large", "aspect", "low_kb_per_pixel", "low_dpi", "missing_dpi")
REQUIRED_COLUMNS = ("sha256", "width", "height", "format", "dpi", "bytes", "dedupe_status")


def failing_rules(images: pd.DataFrame, params: FilterParams) -> pd.DataFrame:
    """One boolean column per rule (in ``RULES`` order): True where the image fails it."""
    width = images["width"].to_numpy(np.float64)
    height = images["height"].to_numpy(np.float64)
    dpi = pd.to_numeric(images["dpi"], errors="coerce").to_numpy(np.float64)
    no_dpi = np.isnan(dpi)
    kb_per_pixel = images["bytes"].to_numpy(np.float64) / 1024 / (width * height)
    aspect = width / height
    fails = {
        "format": ~images["format"].isin(params.allowed_formats).to_numpy(),
        "too_small": np.minimum(width, height) < params.min_side,
        "too_large": np.maximum(width, height) > params.max_side,
        "aspect": (aspect < params.min_aspect) | (aspect > params.max_aspect),
        "low_kb_per_pixel": kb_per_pixel < params.min_kb_per_pixel,
        "low_dpi": ~no_dpi & (dpi < params.min_dpi),
        "missing_dpi": no_dpi & (params.missing_dpi == "drop"),
    }
    return pd.DataFrame(fails, index=images.index)[list(RULES)]


@dataclass(frozen=True)
class FilterResult:
    kept: pd.DataFrame
    dropped: pd.DataFrame  # kept columns plus filter_reason (first failing rule) and filter_reasons (all)
    metrics: dict


def apply_filter(images: pd.DataFrame, params: FilterParams) -> FilterResult:
    fails = failing_rules(images, params)
    dropped_mask = fails.any(axis=1).to_numpy()
    reasons = [list(fails.columns[row]) for row in fails[dropped_mask].to_numpy()]
    dropped = images[dropped_mask].assign(filter_reason=[r[0] for r in reasons], filter_reasons=reasons)
    missing_dpi = pd.to_numeric(images["dpi"], errors="coerce").isna()
    metrics = {
        "images_in": len(images),
        "kept": int((~dropped_mask).sum()),
        "dropped": int(dropped_mask.sum()),
        "dropped_by_rule": {rule: int((dropped["filter_reason"] == rule).sum()) for rule in RULES},
        "failing_by_rule": {rule: int(fails[rule].sum()) for rule in RULES},
        "missing_dpi": int(missing_dpi.sum()),
        "missing_dpi_kept": int((missing_dpi & ~dropped_mask).sum()),
    }
    return FilterResult(images[~dropped_mask].reset_index(drop=True), dropped.reset_index(drop=True), metrics)


def read_deduplicated(path: Path) -> pd.DataFrame:
    """The images the dedupe stage kept: one row per unique image."""
    frame = read_stage_table(path, REQUIRED_COLUMNS, "dedupe")
    kept = frame[frame["dedupe_status"] == "kept"].reset_index(drop=True)
    holes = (
        kept[["width", "height", "bytes", "format"]].isna().any(axis=1) | (kept["width"] <= 0) | (kept["height"] <= 0)
    )
    if holes.any():
        row = int(np.flatnonzero(holes)[0])
        raise PipelineError(f"{path}: kept image {kept['sha256'][row]} has no valid width, height, bytes or format")
    return kept


def run(params: FilterParams) -> dict:
    """Filter the kept images; write the kept and dropped tables; return metrics."""
    result = apply_filter(read_deduplicated(params.table), params)
    write_parquet(params.output / "images.parquet", result.kept)
    write_parquet(params.output / "dropped.parquet", result.dropped)
    return result.metrics
