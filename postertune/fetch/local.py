"""Read local images, a file or an archive member, under the same byte cap as downloads.

Archives are read member by member into memory: nothing is ever extracted to disk, so a
member named ``../../x`` (zip-slip) is only a name.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Payload:
    """The bytes behind one URL, or why there are none."""

    url: str
    data: bytes | None = None
    reason: str | None = None


def read_file(url: str, path: Path, max_bytes: int) -> Payload:
    try:
        # O_NONBLOCK: opening a FIFO planted in a source folder must not hang the run.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Payload(url, reason="not_found")
    except OSError:
        return Payload(url, reason="unreadable")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Payload(url, reason="not_a_file")
        if info.st_size > max_bytes:
            return Payload(url, reason="too_large")
        data = f.read(max_bytes + 1)
    return Payload(url, reason="too_large") if len(data) > max_bytes else Payload(url, data)


def read_archive(path: Path, members: dict[str, str], max_bytes: int) -> Iterator[Payload]:
    """Yield one payload per wanted member (``members`` maps member name to URL).

    Members are read in archive order, one pass, so compressed tar files stay linear.
    """
    pending = dict(members)
    try:
        if zipfile.is_zipfile(path):
            yield from _zip_members(path, pending, max_bytes)
        elif tarfile.is_tarfile(path):
            yield from _tar_members(path, pending, max_bytes)
        else:
            yield from (Payload(url, reason="not_an_archive") for url in pending.values())
            pending.clear()
    except FileNotFoundError:
        reason = "not_found"
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError):
        reason = "damaged_archive"
    else:
        reason = "not_found"  # members the archive does not hold
    yield from (Payload(url, reason=reason) for url in pending.values())


def _zip_members(path: Path, pending: dict[str, str], max_bytes: int) -> Iterator[Payload]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            url = pending.pop(info.filename, None)
            if url is None:
                continue
            if info.file_size > max_bytes:
                yield Payload(url, reason="too_large")
                continue
            try:
                with archive.open(info) as f:
                    data = f.read(max_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError):
                yield Payload(url, reason="damaged_archive")
                continue
            yield Payload(url, reason="too_large") if len(data) > max_bytes else Payload(url, data)


def _tar_members(path: Path, pending: dict[str, str], max_bytes: int) -> Iterator[Payload]:
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            url = pending.pop(member.name, None) if member.isfile() else None
            if url is None:
                continue
            if member.size > max_bytes:
                yield Payload(url, reason="too_large")
                continue
            f = archive.extractfile(member)
            yield Payload(url, f.read()) if f is not None else Payload(url, reason="not_a_file")
