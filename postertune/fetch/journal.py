"""What earlier runs already stored: journal segments beside the shards, URL to image.

Before a shard is published, the images it adds are written as a new segment
(``journal-NNNNN.parquet``, atomically), so after a kill at any moment every published
shard's images are journalled. Entries whose image never reached a published shard
(killed between the two writes) are dropped on load and fetched again. Segments are
only ever added, so publishing costs the same on the first shard and the thousandth.
Failures are not journalled: the next run asks again (a dead link may come back, a
raised byte cap may admit an image). A local file's entry carries its size and
modification time, so a file replaced in place is read again. Each segment names how its
facts were measured (``imagefacts.recipe``: displayed sizes, the pHash and its background,
the JPEG quality estimate); an entry measured another way is measured again from its
stored bytes, so the table never mixes two recipes and nothing is downloaded twice.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from postertune.atomic import write_parquet
from postertune.errors import PipelineError

SEGMENT = re.compile(r"^journal-(\d{5,})\.parquet$")


@dataclass(frozen=True, slots=True)
class StoredImage:
    url: str
    sha256: str
    width: int
    height: int
    format: str
    dpi: float | None
    jpeg_quality: int | None
    phash: str
    bytes: int
    stamp: str = ""  # size:mtime of the local file read ("" for the web): a change reads it again


@dataclass(frozen=True, slots=True)
class Remeasure:
    """A journalled image whose facts were measured under another recipe."""

    sha256: str
    stamp: str


COLUMNS = [f.name for f in fields(StoredImage)]
DTYPES = {"width": "int64", "height": "int64", "dpi": "float64", "jpeg_quality": "Int64", "bytes": "int64"}


class Journal:
    def __init__(self, root: Path, recipe: str):
        self.root, self.recipe = root, recipe

    def segments(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if SEGMENT.match(p.name))

    def load(self, stored: Collection[str]) -> tuple[dict[str, StoredImage], dict[str, Remeasure]]:
        """Every journalled image whose sha256 is in ``stored`` (the published shards), by URL:
        those measured under this journal's recipe, and those to measure again."""
        entries: dict[str, StoredImage] = {}
        again: dict[str, Remeasure] = {}
        for path in self.segments():
            try:
                frame = pd.read_parquet(path)
                if "stamp" not in frame.columns:
                    frame["stamp"] = ""  # a segment from before stamps: local files are read again
                current = frame.get("recipe", pd.Series("", index=frame.index)) == self.recipe
                records = frame[current].reindex(columns=COLUMNS).to_dict("records")
                older = frame[~current][["url", "sha256", "stamp"]].to_dict("records")
            except Exception as exc:  # pyarrow raises several types on a damaged or foreign file
                raise PipelineError(
                    f"{path}: unreadable journal ({type(exc).__name__}); delete it to fetch again"
                ) from None
            for record in older:
                if record["sha256"] in stored:
                    entries.pop(record["url"], None)
                    again[record["url"]] = Remeasure(record["sha256"], record["stamp"])
            for record in records:
                if record["sha256"] in stored:
                    record["dpi"] = None if pd.isna(record["dpi"]) else float(record["dpi"])
                    record["jpeg_quality"] = None if pd.isna(record["jpeg_quality"]) else int(record["jpeg_quality"])
                    again.pop(record["url"], None)
                    entries[record["url"]] = StoredImage(**record)
        return entries, again

    def append(self, images: list[StoredImage]) -> None:
        if not images:
            return
        segments = self.segments()
        number = int(SEGMENT.match(segments[-1].name).group(1)) + 1 if segments else 0
        frame = pd.DataFrame({column: [getattr(e, column) for e in images] for column in COLUMNS}).astype(DTYPES)
        frame["recipe"] = self.recipe
        write_parquet(self.root / f"journal-{number:05d}.parquet", frame)
