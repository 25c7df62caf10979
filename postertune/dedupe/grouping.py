"""Which copy of a duplicate group is kept.

Images are ranked by the keep rule (each criterion higher is better, earlier rows win
ties) and assigned greedily in that order: an image not yet claimed is kept and claims
every unclaimed image within the distance of its own hash. A claimed image claims
nothing, so a chain A~B~C never merges A and C when they are farther apart than the
distance: C stays, or joins a keeper it is close to itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from postertune.dedupe.search import near_pairs

KeepCriterion = Literal["pixels", "kb_per_pixel", "bytes", "dpi"]


def keep_priority(images: pd.DataFrame, keep_order: Sequence[KeepCriterion]) -> np.ndarray:
    """Positions of ``images`` (columns width, height, bytes, dpi), best first."""
    pixels = images["width"].to_numpy(np.float64) * images["height"].to_numpy(np.float64)
    criteria = {
        "pixels": pixels,
        "kb_per_pixel": images["bytes"].to_numpy(np.float64) / 1024 / pixels,
        "bytes": images["bytes"].to_numpy(np.float64),
        "dpi": pd.to_numeric(images["dpi"], errors="coerce").fillna(-1.0).to_numpy(np.float64),
    }
    # np.lexsort sorts by its last key first; negated keys put the highest value first.
    keys = [np.arange(len(images))] + [-criteria[name] for name in reversed(keep_order)]
    return np.lexsort(keys)


@dataclass(frozen=True)
class Assignment:
    keeper: np.ndarray  # per image: position of the image kept in its place (its own if kept)
    distance: np.ndarray  # per image: Hamming distance between its hash and its keeper's


def assign_duplicates(hashes: np.ndarray, priority: np.ndarray, max_distance: int) -> Assignment:
    """Greedy keep-rule assignment of images with ``hashes`` (uint64), ranked by ``priority``."""
    count = len(hashes)
    values, value_of = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    pairs = near_pairs(values, max_distance)
    # Neighbours of each distinct hash value (itself first, at distance 0), as CSR arrays.
    source = np.concatenate([np.arange(len(values)), pairs.first, pairs.second])
    target = np.concatenate([np.arange(len(values)), pairs.second, pairs.first])
    gap = np.concatenate([np.zeros(len(values), np.int64), pairs.distance, pairs.distance])
    by_source = np.argsort(source, kind="stable")
    neighbour, neighbour_gap = target[by_source], gap[by_source]
    neighbour_start = np.searchsorted(source[by_source], np.arange(len(values) + 1))
    # Images holding each distinct hash value, also as CSR arrays.
    holders = np.argsort(value_of, kind="stable")
    holder_start = np.searchsorted(value_of[holders], np.arange(len(values) + 1))

    keeper = np.full(count, -1, dtype=np.int64)
    distance = np.zeros(count, dtype=np.int64)
    alone = (np.diff(neighbour_start) == 1) & (np.diff(holder_start) == 1)
    keeper[alone[value_of]] = np.flatnonzero(alone[value_of])
    claimed_all = alone.copy()  # values whose holders are all assigned
    for image in priority:
        if keeper[image] >= 0:
            continue
        keeper[image] = image
        start, end = neighbour_start[value_of[image]], neighbour_start[value_of[image] + 1]
        for value, gap_bits in zip(neighbour[start:end], neighbour_gap[start:end], strict=True):
            if claimed_all[value]:
                continue
            members = holders[holder_start[value] : holder_start[value + 1]]
            free = members[keeper[members] < 0]
            keeper[free] = image
            distance[free] = gap_bits
            claimed_all[value] = True
    return Assignment(keeper, distance)
