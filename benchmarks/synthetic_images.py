"""Many small, distinct, real JPEG images, fast: inputs for the storage benchmarks."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from postertune.store import ShardWriter, sha256_hex


def small_jpegs(count: int, side: int = 32, seed: int = 0) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
        yield buf.getvalue()


def write_sharded(root: Path, count: int, images_per_shard: int = 4096) -> None:
    with ShardWriter(root, max_images=images_per_shard, max_seconds=float("inf")) as writer:
        for data in small_jpegs(count):
            writer.add(sha256_hex(data), data)


def write_loose(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for data in small_jpegs(count):
        (root / f"{sha256_hex(data)}.jpg").write_bytes(data)
