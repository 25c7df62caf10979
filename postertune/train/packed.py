"""Cached tensors packed into shards: a few files for hundreds of thousands of entries.

An entry is a key (a string without "/") and a few named tensors, stored as
``<key>/<name>`` in a shard: one safetensors file of up to ``max_entries`` entries or
``max_bytes`` bytes, named by the sha256 of its bytes and written atomically. A reader
sees whole shards only, and an interrupted fill keeps every shard it finished. Before a
fill trusts a shard it hashes it: one whose bytes no longer match its name (a copy cut
short, a damaged disk) is deleted, and its entries count as missing, to be encoded again.
Processes that fill one folder at once with different keys write different shards.
Shards are written by safetensors and read as its format lays them out (an 8-byte
header length, a JSON header of dtypes, shapes and byte ranges, then the data): the
header is parsed once per shard, and an entry's tensors are views of the shard mapped
into memory (copy-on-write), with no per-read parsing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save

from postertune.atomic import write_bytes
from postertune.errors import PipelineError

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
MAX_ENTRIES = 4096
MAX_BYTES = 256 << 20  # SDXL latents at 1024²: about 1,000 per shard
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
Slot = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, byte offset in the file, element count


class Unreadable(Exception):
    pass


def read_header(path: Path) -> dict[str, Slot]:
    """Where each tensor of a safetensors file lies; ``Unreadable`` if the header is cut,
    damaged or points past the end of the file."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise Unreadable(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
            slots = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
                count = (end - begin) // dtype.itemsize
                if not 0 <= begin <= end <= size - 8 - length or count != math.prod(shape):
                    raise Unreadable(f"{name} lies outside the file or does not fit its shape")
                slots[name] = (dtype, shape, 8 + length + begin, count)
            return slots
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unreadable(str(exc)) from None


class PackWriter:
    """Collects entries and writes a shard whenever one is full; ``flush`` writes the rest."""

    def __init__(self, folder: Path, max_entries: int, max_bytes: int):
        self.folder, self.max_entries, self.max_bytes = folder, max_entries, max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries = self.bytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            # a copy: an entry is often a view of a batch, and a shard stores each tensor on its own
            self.tensors[f"{key}/{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
            self.bytes += tensor.numel() * tensor.element_size()
        self.entries += 1
        if self.entries >= self.max_entries or self.bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.tensors:
            return
        data = save(self.tensors)
        write_bytes(self.folder / f"{hashlib.sha256(data).hexdigest()}{SUFFIX}", data)
        self.tensors, self.entries, self.bytes = {}, 0, 0


class PackedTensors:
    def __init__(self, folder: Path, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.folder, self.max_entries, self.max_bytes = Path(folder), max_entries, max_bytes
        self._index: dict[str, tuple[str, dict[str, Slot]]] | None = None
        self._unreadable: list[str] = []
        self._maps: dict[str, mmap.mmap] = {}

    def shards(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and _is_digest(p.stem))

    @property
    def index(self) -> dict[str, tuple[str, dict[str, Slot]]]:
        """Key → (shard file name, its tensors by name), from the shards' headers; a key held
        by two shards is read from the first by name."""
        if self._index is None:
            index: dict[str, tuple[str, dict[str, Slot]]] = {}
            self._unreadable = []
            for path in self.shards():
                try:
                    slots = read_header(path)
                except Unreadable:
                    self._unreadable.append(path.name)
                    continue
                held: dict[str, dict[str, Slot]] = {}
                for name, slot in slots.items():
                    key, _, field = name.rpartition("/")
                    held.setdefault(key, {})[field] = slot
                for key, fields in held.items():
                    index.setdefault(key, (path.name, fields))
            self._index = index
        return self._index

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """``keys`` (each once, in order) that no intact shard holds. Every shard that holds one of
        them is hashed first; a shard that is unreadable or whose bytes do not match its name is deleted."""
        keys = list(dict.fromkeys(keys))
        index = self.index
        damaged = set(self._unreadable)
        for shard in sorted({index[key][0] for key in keys if key in index}):
            with (self.folder / shard).open("rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != shard.removesuffix(SUFFIX):
                    damaged.add(shard)
        for shard in sorted(damaged):
            log.warning("%s: damaged cache shard deleted, its entries are encoded again", self.folder / shard)
            (self.folder / shard).unlink(missing_ok=True)
        if damaged:
            self.refresh()
        return [key for key in keys if key not in self.index]

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of ``key``: views of its mapped shard (writing to one copies its page, never the file)."""
        try:
            shard, fields = self.index[key]
        except KeyError:
            raise PipelineError(f"{self.folder}: nothing cached under {key}") from None
        mapped = self._maps.get(shard)
        if mapped is None:
            with (self.folder / shard).open("rb") as f:
                mapped = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return {
            field: torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).view(shape)
            if count
            else torch.empty(shape, dtype=dtype)
            for field, (dtype, shape, offset, count) in fields.items()
        }

    @contextmanager
    def writer(self) -> Iterator[PackWriter]:
        """Add entries; shards are written as they fill, the last one when the block ends without
        an error. The cache then reads its folder afresh."""
        writer = PackWriter(self.folder, self.max_entries, self.max_bytes)
        try:
            yield writer
            writer.flush()
        finally:
            self.refresh()

    def refresh(self) -> None:
        """Forget the index and the open shards: the next read sees the folder as it is now
        (shards written since, by this process or another)."""
        self._index, self._unreadable, self._maps = None, [], {}

    def __getstate__(self) -> dict:  # picklable for data-loader workers: mapped shards are per process
        return {**self.__dict__, "_maps": {}}


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)
