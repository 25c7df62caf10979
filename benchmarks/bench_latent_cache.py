"""Latent cache: packed shards against one file per entry, at 100,000 entries.

    python benchmarks/bench_latent_cache.py [--entries 100000] [--side 16]

Caches ``--entries`` latents (float32, 4 x side x side: 4 KB at side 16) with their
time_ids, keyed as the train stage keys them (image sha256, bucket, crop, flip), in a
fresh folder under the system temp folder, two ways, in the same run:

- packed (the train stage's ``LatentCache``): entries written as its ``fill`` writes them
  (shards of 4,096 entries, each written atomically); the check a run does before it
  trusts the cache (``missing``: read every shard's header, hash every shard); one epoch
  of ``load`` in a shuffled order;
- one file per entry (the baseline: the cache as it was before packing, ``FilePerEntry``
  below): one safetensors file per entry in 256 subfolders, each written atomically, the
  time_ids as metadata; the check is one ``is_file`` per entry; the epoch reads each
  file with ``safe_open``.

The files were just written, so reads come from the page cache in both cases.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postertune.atomic import atomic_path  # noqa: E402
from postertune.train.buckets import Bucket, Crop  # noqa: E402
from postertune.train.latent_cache import LatentCache, LatentEntry  # noqa: E402

POOL = 1024  # distinct latents, reused: the values do not matter, their bytes do


class FilePerEntry:
    """The latent cache before packing: one file per entry."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, entry: LatentEntry) -> Path:
        return self.folder / entry.sha256[:2] / f"{entry.key}.safetensors"

    def missing(self, entries: list[LatentEntry]) -> list[LatentEntry]:
        return [e for e in dict.fromkeys(entries) if not self.path(e).is_file()]

    def save(self, entry: LatentEntry, latent: torch.Tensor) -> None:
        metadata = {"sha256": entry.sha256, "time_ids": ",".join(map(str, entry.crop.time_ids()))}
        with atomic_path(self.path(entry)) as tmp:
            save_file({"latent": latent.contiguous()}, str(tmp), metadata=metadata)

    def load(self, entry: LatentEntry) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.path(entry), framework="pt") as f:
            latent = f.get_tensor("latent")
            time_ids = [int(v) for v in f.metadata()["time_ids"].split(",")]
        return latent, torch.tensor(time_ids, dtype=torch.float32)


def entries(count: int, side: int) -> list[LatentEntry]:
    rng = random.Random(0)
    bucket = Bucket(side * 8, side * 8)
    made = []
    for _ in range(count):
        sha = f"{rng.getrandbits(256):064x}"
        left = rng.randrange(0, 64)
        made.append(LatentEntry(sha, Crop(600, 900, side * 8 + 64, side * 12, left, 0, bucket, rng.random() < 0.5)))
    return made


def read_epoch(cache: LatentCache | FilePerEntry, epoch: list[LatentEntry]) -> float:
    """Load every entry and touch its values, as a training step would."""
    total = 0.0
    for entry in epoch:
        latent, time_ids = cache.load(entry)
        total += float(latent.sum()) + float(time_ids[0])
    return total


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def files_under(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--side", type=int, default=16, help="latent side: 4 x side x side float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    latents = torch.randn(POOL, 4, args.side, args.side)
    todo = entries(args.entries, args.side)
    epoch = random.Random(1).sample(todo, len(todo))
    root = Path(tempfile.mkdtemp(prefix="bench-latent-cache-"))
    try:
        packed = LatentCache(root / "packed", "vae")

        def build_packed() -> None:
            with packed.packed.writer() as writer:
                for i, entry in enumerate(todo):
                    writer.add(entry.key, packed.record(entry, latents[i % POOL]))

        loose = FilePerEntry(root / "loose")

        def build_loose() -> None:
            for i, entry in enumerate(todo):
                loose.save(entry, latents[i % POOL])

        rows = []
        for name, cache, build in (("packed shards (the stage)", packed, build_packed),
                                   ("one file per entry (baseline)", loose, build_loose)):  # fmt: skip
            built = timed(build)
            files = files_under(cache.folder)
            size = sum(p.stat().st_size for p in cache.folder.rglob("*") if p.is_file())
            checked = timed(lambda c=cache: c.missing(todo))
            assert cache.missing(todo[:10]) == []
            read = timed(lambda c=cache: read_epoch(c, epoch))
            rows.append((name, files, size, built, checked, read))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.entries} entries, latents 4x{args.side}x{args.side} float32 ({4 * args.side**2 * 4} bytes) "
          f"with time_ids; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| layout | files | MB on disk | build s | check s | epoch read s | reads/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, files, size, built, checked, read in rows:
        print(f"| {name} | {files} | {size / 1e6:.0f} | {built:.1f} | {checked:.2f} | {read:.1f} "
              f"| {args.entries / read:.0f} |")  # fmt: skip
    (_, pf, _, pb, pc, pr), (_, lf, _, lb, lc, lr) = rows
    print(f"\npacked / one file per entry: files {pf / lf:.5f}, build {pb / lb:.2f}, check {pc / lc:.2f}, "
          f"epoch read {pr / lr:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
