"""A million posters: every data stage at 1,000,000 rows against 100,000, each stage in a process of its own.

    python benchmarks/bench_million.py [--rows 1000000] [--small 100000] [--keep]

For each size, a scratch folder under the system temp folder gets that many distinct
32x32 JPEGs (``synthetic_images.small_jpegs``) as loose files and a Parquet source table
naming them under a ``file:`` prefix, with title, genres and overview columns; every
hundredth row names the previous row's file again. The stages then run in pipeline
order, each reading the previous one's outputs, each in a fresh Python process, timed
around its own code (imports excluded):

1. fetch: the stage's ``run`` (source table, local reads, one decode per image, shards, journal, table);
2. dedupe: the stage's ``run`` on the fetch table (shard index, neighbour search, groups);
3. filter: the stage's ``run`` (sides 16-64 so that the tiny images pass);
4. caption: the stage's ``run`` with the metadata captioner alone (no model) and the
   default export (kohya metadata and one caption sidecar per image);
5. train buckets: what train does with the captions table before any model or image:
   ``read_examples``, ``split_validation``, ``plan_entries`` (nearest bucket and crop
   per image) and one epoch of ``BucketBatchSampler``, with the sdxl profile's buckets;
6. ``dvc status``: a git + DVC repo (``bench_dvc_status``'s helpers) whose one stage
   moves the fetch output's shards into ``data/raw/shards``, committed by ``dvc repro``;
   then ``dvc status`` runs ``--repeats`` times (the first, and the median of all).

Peak memory is the stage process's ``ru_maxrss`` (for ``dvc status``, that of the
largest ``dvc`` process it ran), the interpreter and its imports included. Targets:
each stage's peak memory at most 4 GB at the large size, the time per row at the large
size within 1.5x of the small size's, ``dvc status`` at most 10 s at the large size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
from benchmarks.bench_dvc_status import commit, new_repo, status_times  # noqa: E402
from benchmarks.bench_dvc_status import run as tool  # noqa: E402
from benchmarks.synthetic_images import small_jpegs  # noqa: E402

STAGES = ("fetch", "dedupe", "filter", "caption", "train buckets", "dvc status")
CHUNK = 10_000  # images per generating task and per folder
GENRES = ["Drama", "Crime, Thriller", "['Comedy', 'Romance']", "Horror", "Science Fiction, Adventure"]
MEMORY_TARGET = 4e9
RATIO_TARGET = 1.5
STATUS_TARGET_S = 10.0


@dataclass(frozen=True)
class Measured:
    seconds: float  # for ``dvc status``: the median run
    peak_bytes: int
    note: str = ""
    slowest: float = 0.0  # for ``dvc status``: the slowest run


# --- inputs --------------------------------------------------------------------------------


def _write_chunk(task: tuple[Path, int, int]) -> None:
    folder, start, count = task
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(small_jpegs(count, seed=start), start):
        (folder / f"{i:07d}.jpg").write_bytes(data)


def source_path(row: int) -> str:
    """The file of ``row``, relative to the images folder: every hundredth row repeats the row before."""
    image = row - 1 if row % 100 == 99 else row
    return f"{image // CHUNK:04d}/{image:07d}.jpg"


def prepare(work: Path, rows: int) -> None:
    """``rows`` source rows and their images under ``work/source``."""
    images = work / "source" / "images"
    tasks = [(images / f"{s // CHUNK:04d}", s, min(CHUNK, rows - s)) for s in range(0, rows, CHUNK)]
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_write_chunk, tasks, chunksize=1)
    table = pd.DataFrame(
        {
            "path": [source_path(i) for i in range(rows)],
            "title": [f"Poster {i}" for i in range(rows)],
            "genres": [GENRES[i % len(GENRES)] for i in range(rows)],
            "overview": [f"A story told in {i % 97 + 1} scenes." for i in range(rows)],
        }
    )
    table.to_parquet(work / "source" / "posters.parquet", index=False)


# --- the stages, run in a child process ----------------------------------------------------------


def run_stage(stage: str, work: Path, repeats: int) -> tuple[float, str, float]:
    """Run ``stage`` on ``work``; return its seconds, a note and the slowest run's seconds."""
    from postertune.params import build

    if stage == "fetch":
        from postertune.fetch.params import FetchParams
        from postertune.fetch.run import run

        section = {
            "sources": [
                {
                    "name": "posters",
                    "kind": "table",
                    "path": str(work / "source" / "posters.parquet"),
                    "url_column": "path",
                    "url_prefix": f"file:{work / 'source' / 'images'}/",
                    "metadata_columns": {"title": "title", "genres": "genres", "overview": "overview"},
                }
            ],
            "source_dir": str(work / "source"),
            "shards": str(work / "raw" / "shards"),
            "table": str(work / "raw" / "images.parquet"),
        }
        return _timed(run, build(FetchParams, section, "fetch"), lambda m: f"{m['distinct_images']} images stored")
    if stage == "dedupe":
        from postertune.dedupe.params import DedupeParams
        from postertune.dedupe.run import run

        params = DedupeParams(
            table=work / "raw" / "images.parquet", shards=work / "raw" / "shards", output=work / "dedup"
        )
        return _timed(run, params, lambda m: f"{m['kept']} kept, {m['near_duplicates_removed']} near duplicates")
    if stage == "filter":
        from postertune.filter.params import FilterParams
        from postertune.filter.run import run

        params = FilterParams(
            min_side=16, max_side=64, table=work / "dedup" / "images.parquet", output=work / "filtered"
        )
        return _timed(run, params, lambda m: f"{m['kept']} kept")
    if stage == "caption":
        from postertune.caption.params import CaptionParams
        from postertune.caption.run import run

        section = {
            "images": str(work / "filtered" / "images.parquet"),
            "shards": str(work / "raw" / "shards"),
            "output": str(work / "captions"),
        }
        return _timed(run, build(CaptionParams, section, "caption"), lambda m: f"{m['captioned']} captioned")
    if stage == "train buckets":
        from postertune.train.params import TrainParams

        section = {"resolution": 1024, "bucket_step": 64, "min_bucket_reso": 512, "max_bucket_reso": 2048,
                   "validation": {"split": 0.01}, "captions": str(work / "captions" / "captions.parquet")}  # fmt: skip
        return _timed(bucket_assignment, build(TrainParams, section, "train"), lambda n: f"{n} batches in an epoch")
    if stage == "dvc status":
        times = status_times(work / "repo", repeats)
        note = f"{repeats} runs: " + ", ".join(f"{t:.2f}" for t in times) + " s"
        return statistics.median(times), note, max(times)
    raise ValueError(stage)


def bucket_assignment(params) -> int:
    """Train's work on the captions table before any model loads or any image opens."""
    from postertune.train.data import BucketBatchSampler, plan_entries, read_examples, split_validation

    train, validation = split_validation(read_examples(params.captions), params.validation.split)
    plans = plan_entries(train + validation, params)
    sampler = BucketBatchSampler([plan[0].crop.bucket for plan in plans[: len(train)]], params.batch_size, 1, 0, 0)
    return len(sampler.epoch_batches(0))


def _timed(function, params, describe) -> tuple[float, str, float]:
    start = time.perf_counter()
    result = function(params)
    seconds = time.perf_counter() - start
    return seconds, describe(result), seconds


def child(stage: str, work: Path, repeats: int) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    seconds, note, slowest = run_stage(stage, work, repeats)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = (children.ru_maxrss if stage == "dvc status" else max(own.ru_maxrss, children.ru_maxrss)) * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "note": note, "slowest": slowest}))


# --- the parent ------------------------------------------------------------------------------------


def measure(stage: str, work: Path, repeats: int) -> Measured:
    command = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--repeats", str(repeats)]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


def dvc_repo(work: Path) -> None:
    """A repo whose one stage moves the fetch output's shards into ``data/raw/shards``; ``dvc repro`` commits them."""
    repo = new_repo(work / "repo")
    tool(repo, "dvc", "stage", "add", "-q", "-n", "fetch", "-o", "data/raw/shards",
         f"mkdir -p data/raw && mv {work / 'raw' / 'shards'} data/raw/shards")  # fmt: skip
    tool(repo, "dvc", "repro", "-q")
    commit(repo, "shards")


def bench_size(rows: int, repeats: int, keep: bool) -> dict[str, Measured]:
    work = Path(tempfile.mkdtemp(prefix=f"postertune-bench-million-{rows}-"))
    try:
        start = time.perf_counter()
        prepare(work, rows)
        print(f"{rows} rows: source written in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results = {}
        for stage in STAGES:
            if stage == "dvc status":
                dvc_repo(work)
            results[stage] = measure(stage, work, repeats)
            print(f"{rows} rows: {stage} {results[stage]}", file=sys.stderr, flush=True)
        return results
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="dvc status runs per size")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args.stage, args.work, args.repeats)
        return
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    started = time.perf_counter()
    small = bench_size(args.small, args.repeats, args.keep)
    large = bench_size(args.rows, args.repeats, args.keep)
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\n{os.cpu_count()} cores; load average at start {' '.join(load_start)}, at end {' '.join(load_end)}; "
          f"whole run {time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print(
        f"| stage | s at {args.small:,} | µs/row | peak MB | s at {args.rows:,} | µs/row | peak MB "
        "| per-row ratio | targets | at the large size |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for stage in STAGES:
        s, b = small[stage], large[stage]
        per_small, per_large = s.seconds / args.small, b.seconds / args.rows
        ratio = per_large / per_small
        checks = [f"memory ≤ 4 GB: {'met' if b.peak_bytes <= MEMORY_TARGET else 'not met'}",
                  f"per row ≤ {RATIO_TARGET}x: {'met' if ratio <= RATIO_TARGET else 'not met'}"]  # fmt: skip
        if stage == "dvc status":
            checks.append(
                f"every run ≤ {STATUS_TARGET_S:.0f} s: {'met' if b.slowest <= STATUS_TARGET_S else 'not met'}"
            )
        print(f"| {stage} | {s.seconds:.1f} | {1e6 * per_small:.1f} | {s.peak_bytes / 1e6:.0f} "
              f"| {b.seconds:.1f} | {1e6 * per_large:.1f} | {b.peak_bytes / 1e6:.0f} | {ratio:.2f} "
              f"| {'; '.join(checks)} | {b.note} |")  # fmt: skip


if __name__ == "__main__":
    main()
