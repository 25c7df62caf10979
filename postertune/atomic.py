"""Atomic writes of files and whole folders: a reader or a killed run never sees a half-written one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from postertune.errors import PipelineError

# a write the machine refused: read-only folder or file system, no permission, full disk or
# quota, the file size limit; reported as one line naming the output, not a traceback
WRITE_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    If the machine refuses the write, the temporary file is removed, ``path`` is left as it
    was, and a ``PipelineError`` names ``path`` and the reason.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno not in WRITE_REFUSED:
            raise
        raise PipelineError(f"{path}: cannot write: {os.strerror(exc.errno)}") from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: Path | str, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@contextmanager
def atomic_dir(folder: Path | str) -> Iterator[Path]:
    """Yield an empty folder beside ``folder``; on success it takes ``folder``'s place.

    On failure the new folder is removed and ``folder`` is left as it was. Between the two
    renames ``folder`` is briefly absent, never half-written.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
