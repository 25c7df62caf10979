"""What earlier runs already stored: journal segments beside the shards, URL to image.

Before a shard is published, the images it adds are written as a new segment
(``journal-NNNNN.parquet``, atomically), so after a kill at any moment every published
shard's images are journalled. Entries whose image never reached a published shard
(killed between the two writes) are dropped on load and fetched again. Segments are
only ever added, so publishing costs the same on the first shard and the thousandth.
Failures are not journalled: the next run asks again (a dead link may come back, a
raised byte cap may admit an image). A local file's entry carries its size and
modification time, so a file replaced in place is read again. Each segment names how its
sizes were measured (``SIZES``); entries measured another way (before EXIF orientation was
applied) are read again, so the table never mixes stored and displayed sizes.
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
SIZES = "upright"  # width and height as displayed, EXIF orientation applied


@dataclass(frozen=True)
class StoredImage:
    url: str
    sha256: str
    width: int
    height: int
    format: str
    dpi: float | None
    bytes: int
    stamp: str = ""  # size:mtime of the local file read ("" for the web): a change reads it again


COLUMNS = [f.name for f in fields(StoredImage)]
DTYPES = {"width": "int64", "height": "int64", "dpi": "float64", "bytes": "int64"}


class Journal:
    def __init__(self, root: Path):
        self.root = root

    def segments(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if SEGMENT.match(p.name))

    def load(self, stored: Collection[str]) -> dict[str, StoredImage]:
        """Every journalled image whose sha256 is in ``stored`` (the published shards), by URL."""
        entries = {}
        for path in self.segments():
            try:
                frame = pd.read_parquet(path)
                if "stamp" not in frame.columns:
                    frame["stamp"] = ""  # a segment from before stamps: local files are read again
                if "sizes" not in frame.columns:
                    frame["sizes"] = ""
                frame = frame[frame["sizes"] == SIZES][COLUMNS]
            except Exception as exc:  # pyarrow raises several types on a damaged or foreign file
                raise PipelineError(
                    f"{path}: unreadable journal ({type(exc).__name__}); delete it to fetch again"
                ) from None
            for record in frame.to_dict("records"):
                if record["sha256"] in stored:
                    record["dpi"] = None if pd.isna(record["dpi"]) else float(record["dpi"])
                    entries[record["url"]] = StoredImage(**record)
        return entries

    def append(self, images: list[StoredImage]) -> None:
        if not images:
            return
        segments = self.segments()
        number = int(SEGMENT.match(segments[-1].name).group(1)) + 1 if segments else 0
        frame = pd.DataFrame({column: [getattr(e, column) for e in images] for column in COLUMNS}).astype(DTYPES)
        frame["sizes"] = SIZES
        write_parquet(self.root / f"journal-{number:05d}.parquet", frame)
