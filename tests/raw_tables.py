"""Fetch-stage style inputs for the dedupe and filter tests: an image table and its shard store.

The rows follow the fetch contract (``data/raw/images.parquet``): one per source URL, the
image's sha256, size, format, dpi, JPEG quality, pHash and byte count when it decodes, else
status "failed".
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from postertune.imagefacts import image_facts
from postertune.imagesafe import ImageRejected
from postertune.store import ShardWriter, sha256_hex

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "data" / "demo"


def fetched_row(url: str, data: bytes | None, row: int, **metadata) -> dict:
    base = {"source": "test", "url": url, "row": row, **metadata}
    if data is None:
        return {**base, "sha256": None, "status": "failed", "reason": "not_found"}
    try:
        facts = image_facts(data)
    except ImageRejected as exc:
        return {**base, "sha256": None, "status": "failed", "reason": exc.reason}
    return {**base, "sha256": sha256_hex(data), "width": facts.width, "height": facts.height, "format": facts.format,
            "dpi": facts.dpi, "jpeg_quality": facts.jpeg_quality, "phash": facts.phash, "bytes": len(data),
            "status": "ok", "reason": None}  # fmt: skip


def write_raw(root: Path, images: list[tuple[str, bytes | None, dict]]) -> pd.DataFrame:
    """Write ``root/data/raw/{shards,images.parquet}`` for ``(url, bytes or None, metadata)`` items."""
    rows = []
    with ShardWriter(root / "data" / "raw" / "shards", max_images=8) as writer:
        for position, (url, data, metadata) in enumerate(images):
            row = fetched_row(url, data, position, **metadata)
            if row["status"] == "ok":
                writer.add(row["sha256"], data)
            rows.append(row)
    columns = ["sha256", "source", "url", "row", "title", "overview", "genres", "width", "height", "format", "dpi",
               "jpeg_quality", "phash", "bytes", "status", "reason"]  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame = frame.astype({"dpi": "float64", "jpeg_quality": "Int64"})
    frame.to_parquet(root / "data" / "raw" / "images.parquet", index=False)
    return frame


def demo_images(demo: Path = DEMO) -> list[tuple[str, bytes | None, dict]]:
    """The committed demo set as the fetch stage reads it, with each row's case."""
    cases = {r["poster_path"]: r["case"] for r in csv.DictReader((demo / "cases.csv").open())}
    items = []
    for r in csv.DictReader((demo / "tmdb_posters.csv").open()):
        path = demo / "posters" / r["poster_path"].lstrip("/")
        data = path.read_bytes() if path.is_file() else None
        metadata = {
            "title": r["name"],
            "overview": r["overview"],
            "genres": r["genres"],
            "case": cases[r["poster_path"]],
        }
        items.append((f"file:data/demo/posters{r['poster_path']}", data, metadata))
    return items
