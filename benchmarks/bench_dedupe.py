"""Dedupe's neighbour search at scale: the multi-index search against brute force.

    python benchmarks/bench_dedupe.py [--hashes 300000] [--brute-sample 20000]

``near_pairs`` on uniformly random 64-bit hashes at the default distance and a tighter
one, against brute force (every pair) timed on a subsample and extrapolated by the
square of the size ratio. The hashes themselves cost dedupe nothing: fetch records them
in the decode that verifies each image (``bench_fetch_dedupe.py`` times that).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postertune.dedupe.params import DedupeParams  # noqa: E402
from postertune.dedupe.search import brute_force_pairs, choose_chunks, near_pairs  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds and the result of ``run()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


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
    parser.add_argument("--hashes", type=int, default=300_000)
    parser.add_argument("--brute-sample", type=int, default=20_000)
    args = parser.parse_args()
    bench_search(args.hashes, args.brute_sample)


if __name__ == "__main__":
    main()
