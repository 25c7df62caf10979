"""Source readers: every declared source becomes rows of (source, row, url, metadata).

A table's empty URL cells are skipped and counted. Metadata is carried as text (an empty
cell is ``None``) so every source yields the same column types. A row that cannot be
trusted costs only itself: a ragged CSV line, a list or struct where a URL or metadata
text belongs, or a URL the policy refuses (``urls``) becomes that row's reason.

Only local sources (folder, archive, table under a ``file:`` prefix) produce rows with a
``LocalTarget``; every other row is a web URL.
"""

from __future__ import annotations

import csv
import math
import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from postertune.errors import PipelineError
from postertune.fetch.params import SourceParams
from postertune.fetch.urls import (
    WEB_SCHEMES,
    LocalTarget,
    UrlRejected,
    file_url,
    inside,
    is_file_prefix,
    local_cell,
    local_prefix,
    web_url,
    without_credentials,
)

csv.field_size_limit(max(csv.field_size_limit(), 1 << 27))


@dataclass(frozen=True, slots=True)
class Entry:
    source: str
    row: int
    url: str
    metadata: dict[str, str | None] = field(default_factory=dict)
    rejected: str | None = None  # a reason known before any fetch
    local: LocalTarget | None = None  # the file behind a local source's row; None for the web


@dataclass(frozen=True)
class SourceRows:
    entries: list[Entry]
    skipped_empty_url: int


class _NotText(Exception):
    pass


def read_source(source: SourceParams, allowed_schemes: list[str] | tuple[str, ...] = WEB_SCHEMES) -> SourceRows:
    where = f"fetch.sources[{source.name}].path"
    if not source.path.exists():
        raise PipelineError(f"{source.path}: file not found (param {where})")
    if source.kind == "table":
        _require_regular_file(source.path, where)
        return _read_table(source, allowed_schemes)
    if source.kind == "folder":
        if not source.path.is_dir():
            raise PipelineError(f"{source.path}: not a folder (param {where})")
        root = Path(os.path.realpath(source.path))
        files = _folder_files(source.path, source.extensions)
        return SourceRows(
            [_local_entry(source.name, i, file_url(p), LocalTarget(str(p), root)) for i, p in enumerate(files)], 0
        )
    _require_regular_file(source.path, where)
    root = Path(os.path.realpath(source.path))
    members = _archive_members(source.path, source.extensions, where)
    entries = [
        Entry(source.name, i, file_url(source.path, m), local=LocalTarget(str(source.path), root, m))
        for i, m in enumerate(members)
    ]
    return SourceRows(entries, 0)


def _local_entry(source: str, row: int, url: str, target: LocalTarget, meta: dict | None = None) -> Entry:
    """A local row, refused at once when its path resolves outside its source's folder."""
    if not inside(os.path.realpath(target.path), target.root.as_posix()):
        return Entry(source, row, url, meta or {}, rejected="outside_source")
    return Entry(source, row, url, meta or {}, local=target)


def _require_regular_file(path: Path, where: str) -> None:
    """A FIFO or a device as a source would hang the run or never end: refuse it before reading."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise PipelineError(f"{path}: not a regular file (param {where})")


def _read_table(source: SourceParams, allowed_schemes: list[str] | tuple[str, ...]) -> SourceRows:
    param = f"fetch.sources[{source.name}].path"
    columns, records = _load_table(source.path, param)
    wanted = {
        "url_column": source.url_column,
        **{f"metadata_columns.{k}": v for k, v in source.metadata_columns.items()},
    }
    for name, column in wanted.items():
        if column not in columns:
            raise PipelineError(
                f"{source.path}: no column {column!r} (param fetch.sources[{source.name}].{name}; "
                f"columns: {', '.join(map(str, columns))})"
            )
    url_at = columns.index(source.url_column)
    meta_at = {name: columns.index(col) for name, col in source.metadata_columns.items()}
    local = local_prefix(source.url_prefix) if is_file_prefix(source.url_prefix) else None
    entries: list[Entry] = []
    skipped = 0
    for row, (values, problem) in enumerate(records):
        if problem is not None:
            entries.append(Entry(source.name, row, "", rejected=problem))
            continue
        try:
            cell = _text(values[url_at])
        except _NotText:
            entries.append(Entry(source.name, row, "", rejected="url_not_text"))
            continue
        value = (cell or "").strip()
        if not value:
            skipped += 1
            continue
        try:
            meta = {name: _text(values[at]) for name, at in meta_at.items()}
        except _NotText:
            entries.append(Entry(source.name, row, without_credentials(value), rejected="metadata_not_text"))
            continue
        try:
            if local:
                url, target = local_cell(*local, value)
                entries.append(_local_entry(source.name, row, url, target, meta))
            else:
                entries.append(Entry(source.name, row, web_url(value, source.url_prefix, allowed_schemes), meta))
        except UrlRejected as exc:
            recorded = without_credentials(source.url_prefix + value)
            entries.append(Entry(source.name, row, recorded, meta, rejected=exc.reason))
        except Exception:  # noqa: BLE001 - one hostile cell costs its row, never the run
            recorded = without_credentials(source.url_prefix + value)
            entries.append(Entry(source.name, row, recorded, meta, rejected="invalid_url"))
    return SourceRows(entries, skipped)


Record = tuple[list[object], str | None]  # a row's values, or why the row cannot be read


def _load_table(path: Path, param: str) -> tuple[list[str], list[Record]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        if suffix in (".json", ".jsonl"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise PipelineError(
                f"{path}: unknown table format {suffix!r}, use .csv, .tsv, .json, .jsonl or .parquet (param {param})"
            )
    except (ValueError, OSError, pd.errors.ParserError, csv.Error) as exc:
        raise PipelineError(
            f"{path}: cannot read table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    columns = [str(c) for c in frame.columns]
    return columns, [(list(values), None) for values in frame.itertuples(index=False, name=None)]


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[Record]]:
    """Every record of a CSV/TSV; one whose field count differs from the header's is refused, naming its line."""
    records: list[Record] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise PipelineError(f"{path}: cannot read table (no header line)")
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                records.append(([], f"bad_row: line {line} ({exc})"))
                continue
            if not fields:
                continue  # a blank line is no row
            if len(fields) != len(header):
                records.append(([], f"ragged_row: line {line} has {len(fields)} fields, the header {len(header)}"))
            else:
                records.append((list(fields), None))
    return header, records


def _text(value: object) -> str | None:
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.ndarray, list, tuple, dict, set, bytes, bytearray)):
        raise _NotText  # a Parquet list or struct is not text: never joined into a string and requested
    if isinstance(value, np.generic):
        value = value.item()
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
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as archive:
                    names = [i.filename for i in archive.infolist() if not i.is_dir()]
            else:
                f.seek(0)
                try:
                    archive = tarfile.open(fileobj=f, mode="r:*")
                except tarfile.ReadError:
                    raise PipelineError(f"{path}: not a zip or tar archive (param {param})") from None
                with archive:
                    names = [m.name for m in archive if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise PipelineError(f"{path}: damaged archive ({exc}) (param {param})") from None
    return sorted({n for n in names if Path(n).suffix.lower() in suffixes})
