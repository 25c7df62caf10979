"""Content-addressed image store: images live once, in tar shards, keyed by sha256.

A store is a folder of ``shard-NNNNN.tar`` files whose members are named by the
sha256 of their bytes. A shard is written under a hidden temporary name and renamed
when closed, so a killed writer leaves only complete shards behind (the next run
deletes the leftover partial file and fetches its images again). DVC tracks a few
dozen shard files instead of hundreds of thousands of loose images.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from postertune.errors import PipelineError

SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.tar$")
PARTIAL_SUFFIX = ".partial"
BLOCK = 512  # tar's header and padding unit
# An open shard is pushed to disk in the background after every this many bytes, so closing
# it waits for the last stretch only, not for the whole shard (about 0.5 s per 400 MB here).
WRITEBACK_BYTES = 64 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Location:
    shard: str
    offset: int
    length: int


def shard_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every file in a shard, read from its 512-byte headers
    alone, the data between them skipped: an index of a million images reads a million
    headers, at a twentieth of the cost of ``tarfile``'s full member parse. A header this
    scan does not read (a long name, another tar dialect) hands the shard to ``tarfile``."""
    members = []
    with open(path, "rb", buffering=0) as shard:
        offset = 0
        while (header := os.pread(shard.fileno(), BLOCK, offset)).strip(b"\0"):
            if len(header) < BLOCK:
                raise PipelineError(f"{path}: damaged shard (ends inside a header at byte {offset})")
            member = _plain_member(header, path, offset)
            if member is None:
                return _members_by_tarfile(path)
            name, size = member
            members.append((name, offset + BLOCK, size))
            offset += BLOCK + -(-size // BLOCK) * BLOCK
    if len(header) < BLOCK:
        raise PipelineError(f"{path}: damaged shard (ends inside a header at byte {offset})")
    return members  # up to the end-of-archive block


def _plain_member(header: bytes, path: Path, offset: int) -> tuple[str, int] | None:
    """Name and size of a regular file's USTAR header; None for any other valid header."""
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip(), 8)
    except ValueError:
        return None  # e.g. base-256 numbers
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32 and checksum != _signed_sum(header):
        raise PipelineError(f"{path}: damaged shard (bad header checksum at byte {offset})")
    if header[156:157] not in (b"0", b"\0"):
        return None
    if header[345:346] != b"\0" and header[257:262] == b"ustar":  # a name prefix: left to tarfile
        return None
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), size


def _signed_sum(header: bytes) -> int:
    """The checksum some old tar writers stored: the header's bytes summed as signed chars."""
    return sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])


def _members_by_tarfile(path: Path) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as exc:
        raise PipelineError(f"{path}: damaged shard ({exc})") from None


class ShardStore:
    """Read side: ``store.read(sha)`` returns the bytes of one stored image."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._index: dict[str, Location] | None = None
        self._files: dict[str, int] = {}

    def shard_paths(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if SHARD_PATTERN.match(p.name))

    @property
    def index(self) -> dict[str, Location]:
        if self._index is None:
            index: dict[str, Location] = {}
            for path in self.shard_paths():
                for name, offset, size in shard_members(path):
                    index.setdefault(name, Location(path.name, offset, size))
            self._index = index
        return self._index

    def __contains__(self, sha: str) -> bool:
        return sha in self.index

    def __len__(self) -> int:
        return len(self.index)

    def read(self, sha: str) -> bytes:
        try:
            loc = self.index[sha]
        except KeyError:
            raise PipelineError(f"{self.root}: no image with sha256 {sha}") from None
        fd = self._files.get(loc.shard)
        if fd is None:
            fd = self._files[loc.shard] = os.open(self.root / loc.shard, os.O_RDONLY)
        return os.pread(fd, loc.length, loc.offset)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:  # picklable for data-loader workers: fds are per process
        return {"root": self.root, "_index": self._index, "_files": {}}


class ShardWriter:
    """Append images to the store. The writer alone decides when a shard closes: after
    ``max_images`` images or ``max_bytes`` bytes, and, when ``max_seconds`` is set, after that
    many seconds (the age is checked on every ``add`` and on ``close_if_old``, which a caller
    may call on a timer), whichever comes first, so a killed run loses at most one open
    shard's worth of work. Without an age limit the layout follows from the order of ``add``
    calls alone: the same images added in the same order give byte-identical shards.

    ``before_publish`` runs once a closing shard is complete on disk and before it is
    renamed into place: a caller records what the shard holds there, so a published shard
    is always covered by that record, whatever moment the process is killed at.
    """

    def __init__(
        self,
        root: Path | str,
        max_images: int = 4096,
        max_bytes: int = 1 << 30,
        max_seconds: float | None = None,
        before_publish: Callable[[], None] | None = None,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f".shard-*{PARTIAL_SUFFIX}"):
            leftover.unlink()
        self.max_images, self.max_bytes, self.max_seconds = max_images, max_bytes, max_seconds
        self.before_publish = before_publish
        existing = [int(m.group(1)) for p in self.root.iterdir() if (m := SHARD_PATTERN.match(p.name))]
        self._next = max(existing, default=-1) + 1
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = self._unsynced = 0
        self._opened = 0.0
        self._writeback: ThreadPoolExecutor | None = None
        self._syncing: Future[None] | None = None
        self.written: set[str] = set()

    @property
    def is_open(self) -> bool:
        return self._tar is not None

    def _partial(self) -> Path:
        return self.root / f".shard-{self._next:05d}.tar{PARTIAL_SUFFIX}"

    def add(self, sha: str, data: bytes) -> None:
        if sha in self.written:
            return
        if self._tar is None:
            copybufsize = min(self.max_bytes, 1 << 24)
            self._tar = tarfile.open(self._partial(), "w:", format=tarfile.USTAR_FORMAT, copybufsize=copybufsize)
            self._count = self._bytes = 0
            self._opened = time.monotonic()
        info = tarfile.TarInfo(sha)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self.written.add(sha)
        self._count += 1
        self._bytes += len(data)
        self._unsynced += len(data)
        if self._unsynced >= WRITEBACK_BYTES and (self._syncing is None or self._syncing.done()):
            self._start_writeback()
        if self._count >= self.max_images or self._bytes >= self.max_bytes or self._is_old():
            self.flush()

    def _start_writeback(self) -> None:
        assert self._tar is not None and self._tar.fileobj is not None
        if self._syncing is not None:
            self._syncing.result()  # a failed write-back (full disk, I/O error) stops the writer
        if self._writeback is None:
            self._writeback = ThreadPoolExecutor(1, thread_name_prefix="shard-writeback")
        self._tar.fileobj.flush()
        self._syncing = self._writeback.submit(os.fdatasync, self._tar.fileobj.fileno())
        self._unsynced = 0

    def _finish_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.shutdown(wait=True)
            self._writeback = None
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def _is_old(self) -> bool:
        return self.max_seconds is not None and time.monotonic() - self._opened >= self.max_seconds

    def close_if_old(self) -> None:
        """Close the open shard if it has been open ``max_seconds`` or longer."""
        if self._tar is not None and self._is_old():
            self.flush()

    def flush(self) -> None:
        """Close the open shard and publish it under its final name."""
        if self._tar is None:
            return
        self._finish_writeback()  # before the file closes under it
        self._tar.close()
        self._tar = None
        self._unsynced = 0
        partial = self._partial()
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        if self.before_publish is not None:
            self.before_publish()
        os.replace(partial, self.root / f"shard-{self._next:05d}.tar")
        self._next += 1

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
