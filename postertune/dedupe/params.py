"""The ``dedupe:`` section of ``params.yaml``: how near two posters count as one, which copy stays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from postertune.dedupe.grouping import KeepCriterion
from postertune.params import Bounds, Invalid, NotEmpty

HASH_BITS = 64


@dataclass(frozen=True)
class DedupeParams:
    # Hamming distance between 64-bit pHashes that still counts as the same poster
    max_distance: Annotated[int, Bounds(ge=0, lt=HASH_BITS // 2)] = 10
    keep_order: Annotated[tuple[KeepCriterion, ...], NotEmpty()] = ("pixels", "kb_per_pixel")
    table: Path = Path("data/raw/images.parquet")  # the fetch stage's table
    shards: Path = Path("data/raw/shards")
    output: Path = Path("data/dedup")  # images.parquet and groups.csv

    def __post_init__(self) -> None:
        if len(set(self.keep_order)) != len(self.keep_order):
            raise Invalid("keep_order", f"names a criterion twice: {list(self.keep_order)}")
