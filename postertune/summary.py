"""The guide's statistics of a set of scores, one definition for every stage that reports them."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import pandas as pd
from scipy import stats

GUIDE_STATS = ("count", "mean", "std", "min", "p25", "median", "p75", "max", "skew", "kurtosis")


def guide_summary(values: Iterable[float]) -> dict[str, float]:
    """pandas ``describe()`` (sample std), skew and excess kurtosis (both biased), NaNs left out.
    A statistic that has no value (the std of one score) is NaN."""
    series = pd.Series(values, dtype=float).dropna()
    described = series.describe()
    nan = float("nan")
    with warnings.catch_warnings():  # nearly equal scores: scipy warns of precision, the value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        shape = (
            (float(stats.skew(series, bias=True)), float(stats.kurtosis(series, fisher=True, bias=True)))
            if len(series)
            else (nan, nan)
        )
    return dict(
        count=int(described["count"]),
        mean=float(described.get("mean", nan)),
        std=float(described.get("std", nan)),
        min=float(described.get("min", nan)),
        p25=float(described.get("25%", nan)),
        median=float(described.get("50%", nan)),
        p75=float(described.get("75%", nan)),
        max=float(described.get("max", nan)),
        skew=shape[0],
        kurtosis=shape[1],
    )
