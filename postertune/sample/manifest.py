"""``manifest.csv``: one row per rendered image, the record evaluate reads and reruns trust.

Processes of one launch record each image they render in a part of their own under
``parts/`` (one row, named after the image), which the main process folds into the
manifest once all are done; a rerun after a killed launch trusts the parts as well.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from pathlib import Path

from postertune.atomic import write_text
from postertune.errors import PipelineError

MANIFEST_NAME = "manifest.csv"
PARTS_DIR = "parts"
COLUMNS = (
    "model",
    "prompt_id",
    "category",
    "prompt",
    "negative_prompt",
    "seed",
    "path",
    "settings_hash",
    "model_hash",
    "key",
    "sha256",
)


def read_manifest(output: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier run by image path; none when there was no earlier run."""
    path = Path(output) / MANIFEST_NAME
    return _read_rows(path) if path.exists() else {}


def read_parts(output: Path) -> dict[str, dict[str, str]]:
    """Rows the processes of a launch recorded and no manifest holds yet, by image path."""
    rows = {}
    for part in sorted((Path(output) / PARTS_DIR).rglob("*.csv")):
        rows.update(_read_rows(part))
    return rows


def write_manifest(output: Path, rows: list[dict[str, str]]) -> None:
    write_text(Path(output) / MANIFEST_NAME, _csv(rows))


def write_part(output: Path, row: dict[str, str]) -> None:
    write_text(Path(output) / PARTS_DIR / f"{row['path']}.csv", _csv([row]))


def remove_parts(output: Path) -> None:
    folder = Path(output) / PARTS_DIR
    if folder.exists():
        shutil.rmtree(folder)


def _read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise PipelineError(f"{path}: unexpected columns {reader.fieldnames} (expected {', '.join(COLUMNS)})")
        return {row["path"]: row for row in reader}


def _csv(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def file_sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
