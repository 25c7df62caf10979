"""The evaluate outputs: tables a person reads and the headline metrics DVC compares."""

from __future__ import annotations

import math

import pandas as pd

from postertune.evaluate.stats import Comparison

HEADLINE = (
    "aesthetic_mean",
    "aesthetic_std",
    "aesthetic_min",
    "aesthetic_p25",
    "aesthetic_median",
    "aesthetic_p75",
    "aesthetic_max",
    "aesthetic_skew",
    "aesthetic_kurtosis",
    "clip_score_mean",
    "clip_score_std",
)


def comparison_table(candidate: str, comparisons: dict[str, dict[str, Comparison]]) -> pd.DataFrame:
    rows = [
        dict(candidate=candidate, other=other, metric=metric, **result.as_dict())
        for other, by_metric in comparisons.items()
        for metric, result in by_metric.items()
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "candidate",
            "other",
            "metric",
            "diff",
            "ci_low",
            "ci_high",
            "win_rate",
            "p_value",
            "pairs",
            "prompts",
        ],
    )


def headline_metrics(
    summary: pd.DataFrame, candidate: str, comparisons: dict[str, dict[str, Comparison]], cmmd: dict[str, float]
) -> dict[str, dict[str, float | int]]:
    """``<model>.<stat>`` and ``<candidate>_vs_<other>.<metric>_<stat>``; a value that is not
    finite (e.g. the skew of identical scores) is left out rather than written as NaN."""
    metrics: dict[str, dict[str, float | int]] = {}
    for row in summary.to_dict("records"):
        values = {"images": int(row["aesthetic_count"])} | {key: float(row[key]) for key in HEADLINE}
        if row["model"] in cmmd:
            values["cmmd"] = float(cmmd[row["model"]])
        metrics[row["model"]] = values
    for other, by_metric in comparisons.items():
        values: dict[str, float | int] = {}
        for metric, result in by_metric.items():
            values["pairs"] = result.pairs
            values["prompts"] = result.prompts
            for stat in ("diff", "ci_low", "ci_high", "win_rate", "p_value"):
                values[f"{metric}_{stat}"] = float(getattr(result, stat))
        metrics[f"{candidate}_vs_{other}"] = values
    return {
        group: {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}
        for group, values in metrics.items()
    }
