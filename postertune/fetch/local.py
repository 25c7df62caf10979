"""Read local images, a file or an archive member, under the same byte cap as downloads.

A local read stays inside its source: the path is resolved (symlinks included) and must
lie inside the source's folder, and only a regular file is opened for reading (a FIFO,
a device, ``/dev/zero`` or a ``/proc`` file is refused before any byte is read). Every
read, archive detection included, is bounded by ``max_bytes``.

Archives are read member by member into memory: nothing is ever extracted to disk, so a
member named ``../../x`` (zip-slip) is only a name.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from postertune.fetch.urls import LocalTarget, inside

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, slots=True)
class Payload:
    """The bytes behind one URL, or why there are none."""

    url: str
    data: bytes | None = None
    reason: str | None = None
    stamp: str = ""  # size and modification time of the local file read ("" for the web)


class _Refused(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def stamp_of(info: os.stat_result) -> str:
    return f"{info.st_size}:{info.st_mtime_ns}"


def local_stamp(target: LocalTarget) -> str:
    """What a file (an archive, for a member) looks like now; a change means read it again."""
    try:
        return stamp_of(os.stat(target.path))
    except (OSError, ValueError):
        return ""


def _open_confined(target: LocalTarget) -> tuple[int, os.stat_result]:
    """Open ``target.path`` for reading if it resolves inside its root and is a regular file."""
    path = target.path
    if "\0" in path:
        raise _Refused("invalid_url")
    real = os.path.realpath(path)
    if not inside(real, target.root.as_posix()):
        raise _Refused("outside_source")
    try:
        # O_NOFOLLOW: a symlink swapped in after the check is refused; O_NONBLOCK: a FIFO cannot hang
        fd = os.open(real, OPEN_FLAGS)
    except FileNotFoundError:
        raise _Refused("not_found") from None
    except OSError as exc:
        raise _Refused("outside_source" if exc.errno == errno.ELOOP else "unreadable") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Refused("not_a_file")
    return fd, info


def read_file(url: str, target: LocalTarget, max_bytes: int) -> Payload:
    try:
        fd, info = _open_confined(target)
    except _Refused as exc:
        return Payload(url, reason=exc.reason)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > max_bytes:
            return Payload(url, reason="too_large")
        if info.st_size == 0:  # an empty file, or a /proc file that reports no size: nothing is read
            return Payload(url, reason="empty")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return Payload(url, reason="too_large")
    return Payload(url, data, stamp=stamp_of(info))


def read_archive(target: LocalTarget, members: dict[str, str], max_bytes: int) -> Iterator[Payload]:
    """Yield one payload per wanted member (``members`` maps member name to URL).

    Members are read in archive order, one pass, so compressed tar files stay linear.
    """
    pending = dict(members)
    try:
        fd, info = _open_confined(target)
    except _Refused as exc:
        yield from (Payload(url, reason=exc.reason) for url in pending.values())
        return
    stamp = stamp_of(info)
    reason = "not_found"  # members the archive does not hold
    try:
        with os.fdopen(fd, "rb") as f:
            if zipfile.is_zipfile(f):
                yield from _zip_members(f, pending, max_bytes, stamp)
            else:
                f.seek(0)
                try:
                    archive = tarfile.open(fileobj=f, mode="r:*")
                except tarfile.ReadError:
                    reason = "not_an_archive"
                else:
                    with archive:
                        yield from _tar_members(archive, pending, max_bytes, stamp)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError):
        reason = "damaged_archive"
    yield from (Payload(url, reason=reason) for url in pending.values())


def _zip_members(f: BinaryIO, pending: dict[str, str], max_bytes: int, stamp: str) -> Iterator[Payload]:
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            url = pending.pop(info.filename, None)
            if url is None:
                continue
            if info.file_size > max_bytes:
                yield Payload(url, reason="too_large")
                continue
            try:
                with archive.open(info) as member:
                    data = member.read(max_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError):
                yield Payload(url, reason="damaged_archive")
                continue
            yield Payload(url, reason="too_large") if len(data) > max_bytes else Payload(url, data, stamp=stamp)


def _tar_members(archive: tarfile.TarFile, pending: dict[str, str], max_bytes: int, stamp: str) -> Iterator[Payload]:
    for member in archive:
        url = pending.pop(member.name, None) if member.isfile() else None
        if url is None:
            continue
        if member.size > max_bytes:
            yield Payload(url, reason="too_large")
            continue
        f = archive.extractfile(member)
        if f is None:
            yield Payload(url, reason="not_a_file")
            continue
        data = f.read(max_bytes + 1)
        yield Payload(url, reason="too_large") if len(data) > max_bytes else Payload(url, data, stamp=stamp)
