"""Selection: floors on each score, then the best ``top_k`` overall or shared among k-means
clusters of the image embeddings, so curation keeps the variety of genres and layouts.

Rules, in this fixed order; a dropped image's ``curate_reason`` is the first it fails and
``curate_reasons`` every one:

1. ``missing_image``        the caption row's image is not in the shard store
2. ``unreadable_image``     the image does not decode (the detail is in ``curate_skip``)
3. ``low_jpeg_quality``     a JPEG whose estimated quality is below ``min_jpeg_quality``
4. ``near_blank``           its grey-level spread is below ``min_pixel_std``
5. ``low_aesthetic``        its aesthetic score is below ``min_aesthetic``
6. ``low_clip_similarity``  its caption similarity (``similarity``: max, short or long) is below ``min_clip_similarity``
7. ``top_k``                it passes every floor but is not among the ``top_k`` kept

Floors are inclusive: a score equal to its floor passes. ``top_k`` with ``clusters`` > 1
takes images round by round: each round the next-best of every cluster that still has
one, so every cluster gets ``top_k / clusters`` when it has that many and the slots a
small cluster leaves go to the others; within the last, partial round the better scores
win. Clusters are k-means (k-means++ start, seeded) on every scored image, so they do not
move when a floor does. Ties break by sha256: the same input and seed give the same set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from postertune.curate.params import CurateParams

RULES = (
    "missing_image",
    "unreadable_image",
    "low_jpeg_quality",
    "near_blank",
    "low_aesthetic",
    "low_clip_similarity",
    "top_k",
)
FLOORS = RULES[:-1]
KMEANS_RESTARTS = 4
KMEANS_ITERATIONS = 100


def kmeans(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels 0…k-1 (at most ``len(points)`` clusters): Lloyd's algorithm from a
    k-means++ start, the lowest-inertia of a few seeded restarts; labels numbered by each
    cluster's first point, so they do not depend on the restart that won."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k = min(k, n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(KMEANS_RESTARTS):
        centres = [points[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            total = d2.sum()
            centres.append(points[rng.choice(n, p=d2 / total)] if total > 0 else points[rng.integers(n)])
        centres = np.array(centres)
        labels = np.full(n, -1)
        for _ in range(KMEANS_ITERATIONS):
            d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
            new = d2.argmin(axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = points[labels == c]
                if len(members):
                    centres[c] = members.mean(axis=0)
        inertia = float(((points - centres[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    order = {old: new for new, old in enumerate(dict.fromkeys(best.tolist()))}
    return np.array([order[label] for label in best.tolist()], dtype=np.int64)


def similarity(scores: pd.DataFrame, which: str) -> pd.Series:
    if which == "short":
        return scores["clip_similarity_short"]
    if which == "long":
        return scores["clip_similarity_long"]
    return scores[["clip_similarity_short", "clip_similarity_long"]].max(axis=1, skipna=True)


def failing_floors(scores: pd.DataFrame, params: CurateParams) -> pd.DataFrame:
    """One boolean column per floor rule (in ``FLOORS`` order): True where the image fails it.
    An image with no score cannot pass a floor on it; a floor set to null fails nobody."""
    skip = scores["skip"].fillna("")
    missing = (skip == "missing_image").to_numpy()
    unreadable = skip.str.startswith("unreadable").to_numpy()
    scored = ~(missing | unreadable)

    def below(values: pd.Series, floor: float | None, unscored_fails: bool = True) -> np.ndarray:
        if floor is None:
            return np.zeros(len(scores), dtype=bool)
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return scored & np.where(np.isnan(v), unscored_fails, v < floor)

    fails = {
        "missing_image": missing,
        "unreadable_image": unreadable,
        "low_jpeg_quality": below(scores["jpeg_quality"], params.min_jpeg_quality, unscored_fails=False),
        "near_blank": below(scores["pixel_std"], params.min_pixel_std),
        "low_aesthetic": below(scores["aesthetic_score"], params.min_aesthetic),
        "low_clip_similarity": below(similarity(scores, params.similarity), params.min_clip_similarity),
    }
    return pd.DataFrame(fails, index=scores.index)[list(FLOORS)]


def top_k_rows(eligible: np.ndarray, rank: np.ndarray, clusters: np.ndarray, shas: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows kept among ``eligible`` ones: round by round over clusters."""
    candidates = np.flatnonzero(eligible)
    # best first within each cluster; equal scores by sha256
    order = sorted(candidates, key=lambda i: (clusters[i], -rank[i], shas[i]))
    position = np.zeros(len(rank), dtype=np.int64)
    seen: dict[int, int] = {}
    for i in order:
        position[i] = seen.get(clusters[i], 0)
        seen[clusters[i]] = position[i] + 1
    by_round = sorted(candidates, key=lambda i: (position[i], -rank[i], shas[i]))
    return np.array(sorted(by_round[:k]), dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    kept: np.ndarray  # bool per row
    reason: list[str | None]  # first rule failed, None when kept
    reasons: list[list[str]]
    cluster: np.ndarray  # int per row; -1 for rows not scored
    rank: np.ndarray  # 1-based rank within its cluster among the scored rows; 0 when not scored
    fails: pd.DataFrame


def select(scores: pd.DataFrame, embeddings: np.ndarray, shas: pd.Series, params: CurateParams) -> Selection:
    fails = failing_floors(scores, params)
    scored = ~(fails["missing_image"] | fails["unreadable_image"]).to_numpy()
    cluster = np.full(len(scores), -1, dtype=np.int64)
    if scored.any():
        cluster[scored] = kmeans(embeddings[scored], params.clusters, params.seed)
    rank_values = (
        scores["aesthetic_score"] if params.rank_by == "aesthetic" else similarity(scores, params.similarity)
    ).to_numpy(dtype=np.float64, na_value=np.nan)
    rank_values = np.where(np.isnan(rank_values), -np.inf, rank_values)
    sha_values = shas.astype(str).to_numpy()
    rank = np.zeros(len(scores), dtype=np.int64)
    for c in np.unique(cluster[scored]):
        members = sorted(np.flatnonzero(cluster == c), key=lambda i: (-rank_values[i], sha_values[i]))
        rank[members] = np.arange(1, len(members) + 1)
    passes = ~fails.any(axis=1).to_numpy()
    top = np.zeros(len(scores), dtype=bool)
    if params.top_k is None:
        top = passes.copy()
    else:
        top[top_k_rows(passes, rank_values, cluster, sha_values, params.top_k)] = True
    all_fails = fails.assign(top_k=passes & ~top)
    reasons = [list(all_fails.columns[row]) for row in all_fails.to_numpy()]
    return Selection(top, [r[0] if r else None for r in reasons], reasons, cluster, rank, all_fails)
