"""Source readers: every declared source becomes rows of (source, row, url, metadata).

A table's empty URL cells are skipped and counted. Metadata is carried as text (a list
becomes ``"a, b"``, an empty cell ``None``) so every source yields the same column types.
"""

from __future__ import annotations

import math
import os
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from postertune.errors import PipelineError
from postertune.fetch.params import SourceParams
from postertune.fetch.urls import UrlRejected, file_url, join_prefix


@dataclass(frozen=True)
class Entry:
    source: str
    row: int
    url: str
    metadata: dict[str, str | None] = field(default_factory=dict)
    rejected: str | None = None  # a reason known before any fetch


@dataclass(frozen=True)
class SourceRows:
    entries: list[Entry]
    skipped_empty_url: int


def read_source(source: SourceParams) -> SourceRows:
    where = f"fetch.sources[{source.name}].path"
    if not source.path.exists():
        raise PipelineError(f"{source.path}: file not found (param {where})")
    if source.kind == "table":
        return _read_table(source)
    if source.kind == "folder":
        if not source.path.is_dir():
            raise PipelineError(f"{source.path}: not a folder (param {where})")
        files = _folder_files(source.path, source.extensions)
        return SourceRows([Entry(source.name, i, file_url(p)) for i, p in enumerate(files)], 0)
    members = _archive_members(source.path, source.extensions, where)
    return SourceRows([Entry(source.name, i, file_url(source.path, m)) for i, m in enumerate(members)], 0)


def _read_table(source: SourceParams) -> SourceRows:
    frame = _load_table(source.path, f"fetch.sources[{source.name}].path")
    wanted = {
        "url_column": source.url_column,
        **{f"metadata_columns.{k}": v for k, v in source.metadata_columns.items()},
    }
    for param, column in wanted.items():
        if column not in frame.columns:
            raise PipelineError(
                f"{source.path}: no column {column!r} (param fetch.sources[{source.name}].{param}; "
                f"columns: {', '.join(map(str, frame.columns))})"
            )
    entries: list[Entry] = []
    skipped = 0
    cells = [_text(v) for v in frame[source.url_column].tolist()]
    metadata = {name: [_text(v) for v in frame[col].tolist()] for name, col in source.metadata_columns.items()}
    for row, cell in enumerate(cells):
        value = (cell or "").strip()
        if not value:
            skipped += 1
            continue
        meta = {name: values[row] for name, values in metadata.items()}
        try:
            entries.append(Entry(source.name, row, join_prefix(source.url_prefix, value), meta))
        except UrlRejected as exc:
            entries.append(Entry(source.name, row, source.url_prefix + value, meta, rejected=exc.reason))
    return SourceRows(entries, skipped)


def _load_table(path: Path, param: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if suffix in (".json", ".jsonl"):
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise PipelineError(
            f"{path}: cannot read table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    raise PipelineError(
        f"{path}: unknown table format {suffix!r}, use .csv, .tsv, .json, .jsonl or .parquet (param {param})"
    )


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or None
    text = str(value)
    return text if text.strip() else None


def _folder_files(root: Path, extensions: list[str]) -> list[Path]:
    suffixes = {e.lower() for e in extensions}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files += [Path(folder) / n for n in sorted(names) if Path(n).suffix.lower() in suffixes]
    return sorted(files)


def _archive_members(path: Path, extensions: list[str], param: str) -> list[str]:
    """Names of the image members, sorted; the archive is listed, never extracted."""
    suffixes = {e.lower() for e in extensions}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [i.filename for i in archive.infolist() if not i.is_dir()]
        elif tarfile.is_tarfile(path):
            with tarfile.open(path, "r:*") as archive:
                names = [m.name for m in archive if m.isfile()]
        else:
            raise PipelineError(f"{path}: not a zip or tar archive (param {param})")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise PipelineError(f"{path}: damaged archive ({exc}) (param {param})") from None
    return sorted({n for n in names if Path(n).suffix.lower() in suffixes})
