"""64-bit perceptual hashes of stored images, computed in parallel and cached.

pHash (imagehash.phash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey
image, against their median) rather than dHash: low frequencies survive JPEG
re-encoding, rescaling and small crops, while dHash compares neighbouring pixels, whose
order flips on the flat gradients posters are full of. On 60 synthetic posters drawn
like the demo set, a re-encode at quality 30 moved pHash by at most 2 bits but dHash by
up to 18, and two different posters came as close as 5 bits under dHash (18 under pHash).

A JPEG is decoded with DCT scaling (draft mode) straight to at least twice the 32-pixel
hash input, which skips most of the decode work; the hash moves by a few bits at most
against a full decode (0-4 on 300 synthetic posters), and every image is hashed the same
way. Every byte is still read, so a damaged file is still caught. The image is hashed
upright (its EXIF orientation applied), so a copy stored sideways with an Orientation tag
is the same poster as its upright twin.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import scipy.fftpack  # noqa: F401  imagehash.phash imports it on first use: here, forked workers inherit it

from postertune.atomic import write_parquet
from postertune.imagesafe import DEFAULT_MAX_PIXELS, WHITE, ImageRejected, load_image
from postertune.store import ShardStore

DRAFT_SIZE = (64, 64)
# Names the hash recipe in the cache: a cached hash is reused only under the same recipe
# (and the same background, see ``recipe``).
METHOD = "imagehash.phash-8x8-draft64-upright"
BATCH = 64


def recipe(background: tuple[int, int, int] = WHITE) -> str:
    """The cache's name for hashes of images composited onto ``background``."""
    return f"{METHOD}-on-{''.join(f'{c:02x}' for c in background)}"


def phash64(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, background: tuple[int, int, int] = WHITE) -> int:
    """The pHash of image bytes as an unsigned 64-bit integer (its hex is ``str(imagehash.phash(...))``)."""
    bits = imagehash.phash(load_image(data, max_pixels, draft=DRAFT_SIZE, background=background)).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hex64(value: int) -> str:
    return f"{value:016x}"


HashResult = tuple[str, int | None, str | None]  # sha256, hash or None, rejection reason

_worker_store: ShardStore | None = None
_worker_background: tuple[int, int, int] = WHITE


def _start_worker(store: ShardStore, background: tuple[int, int, int]) -> None:
    global _worker_store, _worker_background
    _worker_store, _worker_background = store, background


def _hash_batch(
    shas: Sequence[str], store: ShardStore | None = None, background: tuple[int, int, int] | None = None
) -> list[HashResult]:
    store = store or _worker_store
    background = background or _worker_background
    results: list[HashResult] = []
    for sha in shas:
        try:
            results.append((sha, phash64(store.read(sha), background=background), None))
        except ImageRejected as exc:
            results.append((sha, None, exc.reason))
    return results


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def iter_hashes(
    store: ShardStore, shas: Sequence[str], workers: int, background: tuple[int, int, int] = WHITE
) -> Iterator[HashResult]:
    """Hash the images ``shas`` of ``store`` (transparency on ``background``) in ``workers``
    processes (1: in this one), yielding results in order as they complete."""
    batches = [shas[i : i + BATCH] for i in range(0, len(shas), BATCH)]
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            yield from _hash_batch(batch, store, background)
        return
    len(store)  # builds the shard index once, before the workers inherit the store
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(store, background)) as pool:
        for results in pool.map(_hash_batch, batches):
            yield from results


def load_cache(path: Path, background: tuple[int, int, int] = WHITE) -> dict[str, int]:
    """Hashes saved by an earlier (possibly interrupted) run under the current recipe."""
    if not path.is_file():
        return {}
    frame = pd.read_parquet(path)
    frame = frame[frame["method"] == recipe(background)]
    return {sha: int(value, 16) for sha, value in zip(frame["sha256"], frame["phash"], strict=True)}


def save_cache(path: Path, hashes: dict[str, int], background: tuple[int, int, int] = WHITE) -> None:
    method = recipe(background)
    frame = pd.DataFrame({"sha256": list(hashes), "phash": [hex64(v) for v in hashes.values()], "method": method})
    write_parquet(path, frame)
