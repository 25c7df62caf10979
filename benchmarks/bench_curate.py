"""Curate throughput: scoring images/s with the tiny CLIP, and what a rerun with new thresholds costs.

    python benchmarks/bench_curate.py [--images 500]

Draws synthetic 600x900 JPEG posters (the demo set's drawing code plus film grain,
about 80-140 KB each as web posters are; cached under the system temp folder) into a shard store, writes a captions table for
them, and runs ``python -m stages.curate`` twice in a fresh folder, as ``dvc repro``
would: first with an empty embedding cache (every image decoded and embedded, the
caption texts embedded, the plots drawn), then with other floors and ``top_k`` (the
cache holds every embedding: no model loads). Both runs in one invocation, on the same
images. Wall time is the whole process (Python and library start included); the stage
time is ``run.seconds`` of ``metrics/curate.json`` (from reading params to the last write).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from postertune.store import ShardStore, ShardWriter, sha256_hex  # noqa: E402
from scripts.make_demo_data import draw_poster, encode  # noqa: E402

GENRES = ["thriller", "comedy", "drama", "anime", "science fiction", "horror"]
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
    root = Path(tempfile.gettempdir()) / f"postertune-bench-posters-{count}"
    if not (root / "complete").exists():
        print(f"drawing {count} posters into {root} ...", file=sys.stderr)
        tasks = [(start, min(start + 100, count)) for start in range(0, count, 100)]
        with multiprocessing.Pool(len(os.sched_getaffinity(0))) as pool, ShardWriter(root, max_images=1000) as writer:
            for batch in pool.imap(draw_batch, tasks):
                for data in batch:
                    writer.add(sha256_hex(data), data)
        (root / "complete").touch()
    return ShardStore(root)


def captions_table(shas: list[str], path: Path) -> None:
    pd.DataFrame(
        {
            "sha256": shas,
            "caption": [f"movie poster, {GENRES[i % len(GENRES)]}, poster {i}" for i in range(len(shas))],
            "caption_long": [f"A {GENRES[i % len(GENRES)]} film poster with a bold title." for i in range(len(shas))],
            "source": [("tmdb_tv", "myanimelist")[i % 2] for i in range(len(shas))],
            "width": WIDTH,
            "height": HEIGHT,
        }
    ).to_parquet(path, index=False)


def run_stage(folder: Path, section: dict) -> tuple[float, dict]:
    (folder / "params.yaml").write_text(yaml.safe_dump({"curate": section}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.curate"], cwd=folder, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return wall, json.loads((folder / "metrics/curate.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    store = poster_store(args.images)
    shas = sorted(store.index)
    mean_kb = sum(loc.length for loc in store.index.values()) / len(shas) / 1024
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())["curate"]
    with tempfile.TemporaryDirectory(prefix="postertune-bench-curate-") as tmp:
        folder = Path(tmp)
        captions_table(shas, folder / "captions.parquet")
        section = demo | {
            "captions": "captions.parquet",
            "shards": str(store.root),
            "output": "data/curated",
            "device": "cpu",
            "top_k": 200,
            "clusters": 8,
        }
        load_before = os.getloadavg()[0]
        cold = run_stage(folder, section)
        median = cold[1]["before"]["aesthetic"]["median"]
        rerun = run_stage(
            folder, section | {"min_aesthetic": median, "min_jpeg_quality": 80, "top_k": 100, "clusters": 4}
        )
        load_after = os.getloadavg()[0]
    print(f"\n### Curate {len(shas)} posters {WIDTH}x{HEIGHT} JPEG, {mean_kb:.0f} KB mean, tiny CLIP, CPU\n")
    print(f"{os.cpu_count()} cores; load average before and after: {load_before:.1f}, {load_after:.1f}\n")
    print("| run | wall s | stage s | images embedded | model loaded | kept | images/s (wall) | images/s (stage) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (wall, metrics) in (
        ("first run, empty cache", cold),
        ("rerun, new floors and top_k (cache hit)", rerun),
    ):
        stage_s = metrics["run"]["seconds"]
        print(
            f"| {name} | {wall:.1f} | {stage_s:.1f} | {metrics['run']['images_embedded']} "
            f"| {'yes' if metrics['run']['model_loaded'] else 'no'} | {metrics['kept']} "
            f"| {len(shas) / wall:.0f} | {len(shas) / stage_s:.0f} |"
        )


if __name__ == "__main__":
    main()
