"""``manifest.csv``: one row per rendered image, the record evaluate reads and reruns trust."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from postertune.atomic import write_text
from postertune.errors import PipelineError

MANIFEST_NAME = "manifest.csv"
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
    if not path.exists():
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise PipelineError(f"{path}: unexpected columns {reader.fieldnames} (expected {', '.join(COLUMNS)})")
        return {row["path"]: row for row in reader}


def write_manifest(output: Path, rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(output) / MANIFEST_NAME, buffer.getvalue())


def file_sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return None
