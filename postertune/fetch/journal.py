"""What a previous run already stored: ``journal.parquet`` beside the shards, URL to image.

The journal is rewritten atomically before each shard is published, so after a kill at
any moment every published shard's images are in it. Entries whose image never reached a
published shard (killed between the two writes) are dropped on load and fetched again.
Failures are not journalled: the next run asks again (a dead link may come back, a raised
byte cap may admit an image).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from postertune.atomic import write_parquet
from postertune.errors import PipelineError

JOURNAL_NAME = "journal.parquet"


@dataclass(frozen=True)
class StoredImage:
    url: str
    sha256: str
    width: int
    height: int
    format: str
    dpi: float | None
    bytes: int


COLUMNS = [f.name for f in fields(StoredImage)]
DTYPES = {"width": "int64", "height": "int64", "dpi": "float64", "bytes": "int64"}


def load_journal(shards: Path, stored: set[str] | dict) -> dict[str, StoredImage]:
    path = shards / JOURNAL_NAME
    if not path.exists():
        return {}
    try:
        frame = pd.read_parquet(path, columns=COLUMNS)
    except Exception as exc:  # pyarrow raises several types on a damaged or foreign file
        raise PipelineError(f"{path}: unreadable journal ({type(exc).__name__}); delete it to fetch again") from None
    entries = {}
    for record in frame.to_dict("records"):
        if record["sha256"] in stored:
            dpi = record["dpi"]
            record["dpi"] = None if pd.isna(dpi) else float(dpi)
            entries[record["url"]] = StoredImage(**record)
    return entries


def save_journal(shards: Path, entries: dict[str, StoredImage]) -> None:
    images = entries.values()
    frame = pd.DataFrame({column: [getattr(e, column) for e in images] for column in COLUMNS}).astype(DTYPES)
    write_parquet(shards / JOURNAL_NAME, frame)
