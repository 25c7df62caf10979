"""Per-captioner cache: what a captioner produced for each image, keyed by sha256 and
by a hash of the captioner's settings, so a rerun captions only what is new.

Each settings hash has its own folder of Parquet parts; every chunk of work is one
part written atomically, so a killed run keeps every finished chunk. Processes of one
launch write side by side, each part's name marked with its process (``part-000003-r1``).
``compact`` folds the parts into one when a captioner finishes. Old settings keep their folder,
so switching back to them costs nothing; ``current.json`` beside the folders names
the ones the last run used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from postertune.atomic import atomic_path, write_json
from postertune.errors import PipelineError
from postertune.fingerprint import short_fingerprint

_PART = re.compile(r"^part-(\d{6,})(-r\d+)?\.parquet$")
_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("text", pa.string()),
        ("long_text", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("skip", pa.string()),
        ("bad_image", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class CaptionRecord:
    """One captioner's verdict on one image: texts or a tag list, or why it has none."""

    sha256: str
    text: str | None = None
    long_text: str | None = None  # a captioner's own long form, when it has one
    tags: tuple[str, ...] | None = None
    skip: str | None = None
    bad_image: bool = False  # the image itself is unusable (missing or undecodable)

    @property
    def ok(self) -> bool:
        return self.skip is None


class CaptionCache:
    def __init__(self, root: Path, captioner: str, settings: dict, suffix: str = ""):
        self.settings = settings
        self.suffix = suffix  # marks the parts this process writes (launch.Processes.suffix)
        self.folder = Path(root) / f"{captioner}-{short_fingerprint(settings)}"
        self.records: dict[str, CaptionRecord] = {}
        for part in self._parts():
            self.records.update(_read_part(part))

    def _parts(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if _PART.match(p.name)), key=lambda p: p.name)

    def __contains__(self, sha: str) -> bool:
        return sha in self.records

    def add(self, records: list[CaptionRecord]) -> None:
        """Persist ``records`` as one new part, then remember them."""
        if not records:
            return
        if not (self.folder / "settings.json").exists():
            write_json(self.folder / "settings.json", self.settings)
        number = max((int(_PART.match(p.name).group(1)) for p in self._parts()), default=-1) + 1
        _write_part(self.folder / f"part-{number:06d}{self.suffix}.parquet", records)
        self.records.update((r.sha256, r) for r in records)

    def compact(self) -> None:
        """Fold all parts into one: the merged part is written before the old ones go."""
        parts = self._parts()
        if len(parts) < 2:
            return
        self.add(list(self.records.values()))
        for part in parts:
            part.unlink()


def _write_part(path: Path, records: list[CaptionRecord]) -> None:
    table = pa.Table.from_pylist(
        [
            {
                "sha256": r.sha256,
                "text": r.text,
                "long_text": r.long_text,
                "tags": list(r.tags) if r.tags is not None else None,
                "skip": r.skip,
                "bad_image": r.bad_image,
            }
            for r in records
        ],
        schema=_SCHEMA,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_part(path: Path) -> dict[str, CaptionRecord]:
    try:
        rows = pq.read_table(path, schema=_SCHEMA).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise PipelineError(
            f"{path}: damaged caption cache part ({type(exc).__name__}); delete it to caption its images again"
        ) from None
    return {
        row["sha256"]: CaptionRecord(
            sha256=row["sha256"],
            text=row["text"],
            long_text=row["long_text"],
            tags=tuple(row["tags"]) if row["tags"] is not None else None,
            skip=row["skip"],
            bad_image=bool(row["bad_image"]),
        )
        for row in rows
    }
