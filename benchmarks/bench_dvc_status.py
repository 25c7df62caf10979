"""`dvc status` with nothing changed: 100,000 images in shards against the same images as loose files.

    python benchmarks/bench_dvc_status.py [--images 100000] [--loose-images 100000] [--repeats 3]

Makes a temporary git + DVC repo per layout. Shards: a stage writes the images into
``data/raw/shards`` with the project's ``ShardWriter`` (about 25 tar files) as its
output, the way the fetch stage does, and ``dvc repro`` commits them. Loose (the
baseline, in the same run): the same kind of images, one file each, tracked with
``dvc add``. Then ``dvc status`` runs ``--repeats`` times in each repo; the first run
after the commit and the median of the rest are reported, with the time it took to
write the images and have DVC track them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
from benchmarks.synthetic_images import write_loose  # noqa: E402


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT)
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")  # fmt: skip
    return env


def run(repo: Path, *cmd: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=repo, env=tool_env(), check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    run(path, "git", "init", "-q")
    run(path, "dvc", "init", "-q")
    return path


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)


def status_times(repo: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        seconds, out = run(repo, "dvc", "status")
        assert "up to date" in out, out
        times.append(seconds)
    return times


def sharded_repo(root: Path, count: int) -> tuple[Path, float]:
    repo = new_repo(root / "shards")
    make = f"from benchmarks.synthetic_images import write_sharded; write_sharded(__import__('pathlib').Path('data/raw/shards'), {count})"
    run(repo, "dvc", "stage", "add", "-q", "-n", "fetch", "-o", "data/raw/shards", f'python -c "{make}"')
    seconds, _ = run(repo, "dvc", "repro", "-q")
    commit(repo, "shards")
    return repo, seconds


def loose_repo(root: Path, count: int) -> tuple[Path, float]:
    repo = new_repo(root / "loose")
    start = time.perf_counter()
    write_loose(repo / "data" / "raw" / "images", count)
    run(repo, "dvc", "add", "-q", "data/raw/images")
    seconds = time.perf_counter() - start
    commit(repo, "loose images")
    return repo, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--loose-images", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="postertune-bench-status-"))
    try:
        rows = []
        for name, build, count in [("shards (stage output)", sharded_repo, args.images),
                                   ("loose files (dvc add)", loose_repo, args.loose_images)]:  # fmt: skip
            repo, tracking = build(root, count)
            times = status_times(repo, args.repeats)
            rows.append((name, count, tracking, times[0], statistics.median(times[1:] or times)))
        print(f"\nload average: {os.getloadavg()[0]:.1f}\n")
        print("| layout | images | write + track s | first `dvc status` s | median `dvc status` s |")
        print("|---|---:|---:|---:|---:|")
        for name, count, tracking, first, median in rows:
            print(f"| {name} | {count} | {tracking:.1f} | {first:.2f} | {median:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
