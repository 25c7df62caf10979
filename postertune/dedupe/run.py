"""The dedupe stage's work on the fetched image table.

Rows that fetched an image are marked ``kept``, ``exact_duplicate`` (a later row with the
same sha256 as another) or ``near_duplicate`` (a different file whose pHash lies within
``max_distance`` bits of a kept image's). ``duplicate_of`` always names the sha256 of the
kept image that stands in for the row. Rows whose fetch failed carry no image and are
left out (``data/raw/images.parquet`` keeps them, with their reasons). The pHashes come
from the fetch table (measured in the decode that verified each image): no image is
decoded here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from postertune.atomic import write_parquet, write_text
from postertune.dedupe.grouping import assign_duplicates, keep_priority
from postertune.dedupe.params import DedupeParams
from postertune.errors import PipelineError
from postertune.store import ShardStore
from postertune.tables import read_stage_table

REQUIRED_COLUMNS = ("sha256", "url", "width", "height", "bytes", "dpi", "phash", "status")
PHASH = r"[0-9a-f]{16}"


def read_fetched(path: Path) -> tuple[pd.DataFrame, int]:
    """The rows of the fetch table that hold an image, and the count of rows that do not."""
    frame = read_stage_table(path, REQUIRED_COLUMNS, "fetch")
    fetched = frame["status"] == "ok"
    needed = ["sha256", "width", "height", "bytes", "phash"]
    holes = fetched & frame[needed].isna().any(axis=1)
    if holes.any():
        row = int(np.flatnonzero(holes)[0])
        raise PipelineError(f"{path}: row {row} has status ok but no {' or '.join(needed)}")
    malformed = fetched & ~frame["phash"].astype(str).str.fullmatch(PHASH)
    if malformed.any():
        row = int(np.flatnonzero(malformed)[0])
        raise PipelineError(f"{path}: row {row}: phash {frame['phash'][row]!r} is not 16 hex digits")
    return frame[fetched].reset_index(drop=True), int((~fetched).sum())


def table_hashes(rows: pd.DataFrame) -> dict[str, int]:
    """Each image's pHash as a 64-bit integer, by sha256."""
    return {sha: int(value, 16) for sha, value in zip(rows["sha256"], rows["phash"], strict=True)}


def mark_duplicates(rows: pd.DataFrame, hashes: dict[str, int], params: DedupeParams) -> pd.DataFrame:
    """``rows`` (fetched images, table order) plus ``dedupe_status``, ``duplicate_of`` and
    ``dedupe_distance`` (bits from the kept image's hash)."""
    first_of_sha = ~rows["sha256"].duplicated()
    images = rows[first_of_sha]
    priority = keep_priority(images, params.keep_order)
    image_hashes = np.array([hashes[sha] for sha in images["sha256"]], dtype=np.uint64)
    assignment = assign_duplicates(image_hashes, priority, params.max_distance)
    image_sha = images["sha256"].to_numpy()
    keeper_of = dict(zip(image_sha, image_sha[assignment.keeper], strict=True))
    distance_of = dict(zip(image_sha, assignment.distance, strict=True))

    out = rows.copy()
    keeper = out["sha256"].map(keeper_of)
    out["dedupe_status"] = np.where(
        ~first_of_sha, "exact_duplicate", np.where(keeper == out["sha256"], "kept", "near_duplicate")
    )
    out["duplicate_of"] = keeper.where(out["dedupe_status"] != "kept", None)
    out["dedupe_distance"] = out["sha256"].map(distance_of).astype(np.int64)
    return out


def duplicate_groups(marked: pd.DataFrame) -> pd.DataFrame:
    """One row per table row that belongs to a group of two or more, kept row first."""
    kept_sha = marked["duplicate_of"].fillna(marked["sha256"])
    in_group = kept_sha.duplicated(keep=False)
    groups = marked[in_group].assign(kept_sha256=kept_sha[in_group], position=np.flatnonzero(in_group))
    order = groups.groupby("kept_sha256", sort=False)["position"].transform("min")
    groups = groups.assign(
        group=order.rank(method="dense").astype(np.int64),
        role=(groups["dedupe_status"] != "kept").astype(int),
    )
    groups = groups.sort_values(["group", "role", "dedupe_distance", "position"])
    columns = {"group": "group", "kept_sha256": "kept_sha256", "sha256": "member_sha256",
               "dedupe_status": "status", "dedupe_distance": "distance",
               "width": "width", "height": "height", "url": "url"}  # fmt: skip
    return groups[list(columns)].rename(columns=columns).reset_index(drop=True)


def run(params: DedupeParams) -> dict:
    """Mark duplicates in the fetch table; write the marked table and the groups; return metrics."""
    rows, failed = read_fetched(params.table)
    store = ShardStore(params.shards)
    shas = list(dict.fromkeys(rows["sha256"]))
    absent = [sha for sha in shas if sha not in store]
    if absent:
        row = int(np.flatnonzero(rows["sha256"] == absent[0])[0])
        raise PipelineError(f"{params.table}: image {absent[0]} of url {rows['url'][row]} is not in {params.shards}")
    started = time.monotonic()
    marked = mark_duplicates(rows, table_hashes(rows), params)
    search_seconds = time.monotonic() - started
    groups = duplicate_groups(marked)
    write_parquet(params.output / "images.parquet", marked)
    write_text(params.output / "groups.csv", groups.to_csv(index=False))
    status = marked["dedupe_status"].value_counts()
    return {
        "images_in": len(rows),
        "failed_fetch_rows_skipped": failed,
        "unique_images": len(shas),
        "exact_duplicates_removed": int(status.get("exact_duplicate", 0)),
        "near_duplicates_removed": int(status.get("near_duplicate", 0)),
        "kept": int(status.get("kept", 0)),
        "duplicate_groups": int(groups["group"].max()) if len(groups) else 0,
        "search_seconds": search_seconds,
    }
