"""Summary statistics per model and paired comparisons between models.

Images of two models that share a (prompt, seed) pair form a pair. Images of one prompt
are not independent of each other, so the interval and the test treat prompts as the
unit: the bootstrap resamples prompts, the test runs on per-prompt mean differences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from postertune.errors import PipelineError
from postertune.summary import guide_summary

METRICS = {"aesthetic": "aesthetic_score", "clip_score": "clip_score"}  # metric name: score column


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model: the guide's statistics of the aesthetic score (``postertune.summary``), and the
    CLIP score's mean and population std."""
    rows = []
    for model, group in scores.groupby("model", sort=False):
        aesthetic = {f"aesthetic_{k}": v for k, v in guide_summary(group["aesthetic_score"]).items()}
        rows.append(
            dict(
                model=model,
                **aesthetic,
                clip_score_mean=np.mean(group["clip_score"]),
                clip_score_std=np.std(group["clip_score"]),
            )
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Comparison:
    diff: float  # mean over pairs of candidate − other
    ci_low: float
    ci_high: float
    win_rate: float  # share of pairs the candidate scores higher (ties count half)
    p_value: float
    pairs: int
    prompts: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_differences(scores: pd.DataFrame, candidate: str, other: str, column: str) -> pd.DataFrame:
    """``prompt_id``, ``seed`` and ``diff`` for every pair both models rendered."""
    keys = ["prompt_id", "seed"]
    left = scores.loc[scores["model"] == candidate, keys + [column]]
    right = scores.loc[scores["model"] == other, keys + [column]]
    pairs = left.merge(right, on=keys, suffixes=("_a", "_b"))
    if pairs.empty:
        raise PipelineError(f"models {candidate!r} and {other!r} share no (prompt, seed) pair to compare")
    pairs["diff"] = pairs[f"{column}_a"] - pairs[f"{column}_b"]
    return pairs[keys + ["diff"]]


def win_rate(diffs: np.ndarray) -> float:
    diffs = np.asarray(diffs)
    return float(np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0))


def bootstrap_interval(per_prompt: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of per-prompt differences, resampling prompts."""
    per_prompt = np.asarray(per_prompt, dtype=float)
    if len(per_prompt) < 2:
        return float("nan"), float("nan")
    if np.all(per_prompt == per_prompt[0]):
        return float(per_prompt[0]), float(per_prompt[0])
    result = stats.bootstrap(
        (per_prompt,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_p_value(per_prompt: np.ndarray, test: str, resamples: int, seed: int) -> float:
    """Two-sided p-value that the per-prompt differences are centred on zero."""
    per_prompt = np.asarray(per_prompt, dtype=float)
    if np.all(per_prompt == 0):
        return 1.0
    if test == "wilcoxon":
        return float(stats.wilcoxon(per_prompt).pvalue)
    result = stats.permutation_test(
        (per_prompt,),
        np.mean,
        permutation_type="samples",
        n_resamples=resamples,
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def compare(
    scores: pd.DataFrame,
    candidate: str,
    other: str,
    column: str,
    confidence: float,
    resamples: int,
    test: str,
    seed: int,
) -> Comparison:
    pairs = paired_differences(scores, candidate, other, column)
    per_prompt = pairs.groupby("prompt_id", sort=True)["diff"].mean().to_numpy()
    low, high = bootstrap_interval(per_prompt, confidence, resamples, seed)
    return Comparison(
        diff=float(pairs["diff"].mean()),
        ci_low=low,
        ci_high=high,
        win_rate=win_rate(pairs["diff"].to_numpy()),
        p_value=paired_p_value(per_prompt, test, resamples, seed),
        pairs=len(pairs),
        prompts=len(per_prompt),
    )
