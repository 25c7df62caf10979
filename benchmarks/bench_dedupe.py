"""Dedupe throughput: hashing images/s including decode, and the neighbour search at scale.

    python benchmarks/bench_dedupe.py [--images 3000] [--hashes 300000] [--brute-sample 20000]

Hashing: draws synthetic 600x900 JPEG posters (the demo set's drawing code plus film
grain, about 80-140 KB each as web posters are; cached under the system temp folder), stores them in a
shard store and times the stage's hashing (``iter_hashes``: read from the store, JPEG
draft decode, pHash, in one process per core). The baseline, measured in the same run
on the same images, is ``imagehash.phash`` on a full decode in a single process; a
single-process draft-decode run separates the gain of the reduced decode from that of
the processes.

Search: ``near_pairs`` on uniformly random 64-bit hashes at the default distance and a
tighter one, against brute force (every pair) timed on a subsample and extrapolated
by the square of the size ratio.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postertune.dedupe.hashing import default_workers, iter_hashes  # noqa: E402
from postertune.dedupe.params import DedupeParams  # noqa: E402
from postertune.dedupe.search import brute_force_pairs, choose_chunks, near_pairs  # noqa: E402
from postertune.store import ShardStore, ShardWriter, sha256_hex  # noqa: E402
from scripts.make_demo_data import draw_poster, encode  # noqa: E402

WIDTH, HEIGHT = 600, 900


def draw_batch(task: tuple[int, int]) -> list[bytes]:
    start, stop = task
    grain = np.random.default_rng(start).normal(0, 6, (HEIGHT * 2, WIDTH * 2, 1)).astype(np.float32)
    posters = []
    for index in range(start, stop):
        img = np.asarray(draw_poster(index, WIDTH, HEIGHT, f"Poster {index}", grain=0), np.float32)
        y, x = (index * 7919) % HEIGHT, (index * 104729) % WIDTH
        noisy = np.clip(img + grain[y : y + HEIGHT, x : x + WIDTH], 0, 255).astype(np.uint8)
        posters.append(encode(Image.fromarray(noisy, "RGB"), quality=85))
    return posters


def poster_store(count: int) -> ShardStore:
    root = Path(tempfile.gettempdir()) / f"postertune-bench-dedupe-{count}"
    if not (root / "complete").exists():
        print(f"drawing {count} posters into {root} ...", file=sys.stderr)
        tasks = [(start, min(start + 100, count)) for start in range(0, count, 100)]
        with multiprocessing.Pool(default_workers()) as pool, ShardWriter(root, max_images=1000) as writer:
            for batch in pool.imap(draw_batch, tasks):
                for data in batch:
                    writer.add(sha256_hex(data), data)
        (root / "complete").touch()
    return ShardStore(root)


def full_decode_phash(store: ShardStore, shas: list[str]) -> None:
    for sha in shas:
        imagehash.phash(Image.open(io.BytesIO(store.read(sha))))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds and the result of ``run()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def bench_hashing(count: int) -> None:
    store = poster_store(count)
    shas = sorted(store.index)
    mean_kb = np.mean([loc.length for loc in store.index.values()]) / 1024
    workers = default_workers()
    load_before = os.getloadavg()[0]
    full = timed(lambda: full_decode_phash(store, shas))
    draft_one = timed(lambda: list(iter_hashes(store, shas, workers=1)))
    stage = timed(lambda: list(iter_hashes(store, shas, workers=workers)))
    print(f"\n### Hashing {len(shas)} posters {WIDTH}x{HEIGHT} JPEG, {mean_kb:.0f} KB mean, {workers} cores\n")
    print(f"load average before and after: {load_before:.1f}, {os.getloadavg()[0]:.1f}\n")
    print("| method | wall s | images/s | vs baseline | CPU ms/image | images/s on idle cores |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, cpu, _), processes in [
        ("baseline: imagehash.phash, full decode, 1 process", full, 1),
        ("draft decode + pHash, 1 process", draft_one, 1),
        (f"stage: draft decode + pHash, {workers} processes", stage, workers),
    ]:
        rate, cpu_ms = len(shas) / wall, cpu / len(shas) * 1000
        print(f"| {name} | {wall:.1f} | {rate:.0f} | {rate * full[0] / len(shas):.1f}x | {cpu_ms:.2f} "
              f"| {processes * 1000 / cpu_ms:.0f} |")  # fmt: skip


def bench_search(count: int, sample: int) -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)
    print(f"\n### Neighbour search over {count} random 64-bit hashes\n")
    print("| max distance | chunks | pairs found | multi-index CPU s | brute force CPU s (extrapolated) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for distance in sorted({DedupeParams().max_distance, 8}):
        _, search, pairs = timed(lambda d=distance: near_pairs(hashes, d))
        _, brute, _ = timed(lambda d=distance: brute_force_pairs(hashes[:sample], d))
        brute *= (count / sample) ** 2
        chunks = choose_chunks(count, distance)
        print(f"| {distance} | {chunks} | {len(pairs)} | {search:.1f} | {brute:.0f} | {brute / search:.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--hashes", type=int, default=300_000)
    parser.add_argument("--brute-sample", type=int, default=20_000)
    args = parser.parse_args()
    bench_hashing(args.images)
    bench_search(args.hashes, args.brute_sample)


if __name__ == "__main__":
    main()
