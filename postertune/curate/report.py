"""``metrics/curate.json``: kept and dropped per rule, and the score summaries before and after
(all scored images, then the kept ones) with the guide's statistics, per source and per cluster."""

from __future__ import annotations

import math

import pandas as pd

from postertune.curate.select import RULES, Selection
from postertune.summary import guide_summary

SUMMARISED = {"aesthetic": "aesthetic_score", "clip_similarity": "clip_similarity", "jpeg_quality": "jpeg_quality"}


def finite(values: dict) -> dict:
    """``values`` without the entries that are not finite numbers (NaN statistics of empty sets)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = finite(value)
            if value:
                out[key] = value
        elif not (isinstance(value, float) and not math.isfinite(value)):
            out[key] = value
    return out


def summaries(frame: pd.DataFrame) -> dict:
    return {name: guide_summary(pd.to_numeric(frame[column], errors="coerce")) for name, column in SUMMARISED.items()}


def _means(frame: pd.DataFrame, kept: pd.Series) -> dict:
    aesthetic = pd.to_numeric(frame["aesthetic_score"], errors="coerce")
    return {
        "images": len(frame),
        "kept": int(kept.sum()),
        "aesthetic_mean_before": float(aesthetic.mean()) if len(frame) else float("nan"),
        "aesthetic_mean_after": float(aesthetic[kept].mean()) if kept.any() else float("nan"),
    }


def curate_metrics(table: pd.DataFrame, selection: Selection, run: dict) -> dict:
    """``table``: every caption row with its scores, ``source``, ``cluster`` and ``kept``."""
    kept = pd.Series(selection.kept, index=table.index)
    scored = table["cluster"] >= 0
    reasons = pd.Series(selection.reason, index=table.index)
    metrics = {
        "enabled": 1,
        "images_in": len(table),
        "scored": int(scored.sum()),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "dropped_by_rule": {rule: int((reasons == rule).sum()) for rule in RULES},
        "failing_by_rule": {rule: int(selection.fails[rule].sum()) for rule in RULES},
        "before": summaries(table[scored]),
        "after": summaries(table[kept]),
        "per_source": {
            str(source): _means(group, kept[group.index]) for source, group in table.groupby("source", sort=True)
        },
        "per_cluster": {
            f"cluster_{int(c)}": _means(group, kept[group.index])
            for c, group in table[scored].groupby("cluster", sort=True)
        },
        "run": run,
    }
    return finite(metrics)


def disabled_metrics(images: int, run: dict) -> dict:
    return {"enabled": 0, "images_in": images, "scored": 0, "kept": images, "dropped": 0, "run": run}
