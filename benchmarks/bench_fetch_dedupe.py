"""Fetch + dedupe: one decode per image against a decode in each stage, and beside img2dataset.

    python benchmarks/bench_fetch_dedupe.py [--images 2000] [--rounds 3] [--img2dataset PATH]

Draws 600x900 JPEG posters (quality 94, about 200 KB; cached under the system temp folder),
serves them from memory on 127.0.0.1 (``bench_fetch``'s server, in its own process) and
times, on a fresh store each time, with the methods taking turns within each round:

- one decode (the stages): the fetch stage's ``run``, whose single reduced-scale decode
  verifies each image and records its pHash, then the dedupe stage's ``run``, which reads
  the hashes from the fetch table;
- two decodes (the baseline): the same fetch with the decode that only verifies
  (``verify_only``), then a dedupe that reads every stored image back and decodes it again
  for its pHash in one process per core (``hash_again``), then the same grouping;
- the two stage commands, ``python -m stages.fetch`` then ``python -m stages.dedupe``, as
  a run starts them (interpreter and imports included);
- the floor: the stages' decode alone (``image_facts`` on every poster, read into memory
  beforehand, in ``--decode-workers`` threads): what verifying and measuring the images
  costs with no network, no store and no interpreter start;
- with ``--img2dataset``: img2dataset's command on the same URLs, 2 processes x 64 threads,
  ``--disable_all_reencoding`` (its bytes are stored as downloaded, never decoded), tar
  shards (``webdataset``), no retries. It and the stage commands are timed the same way,
  as whole commands.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import yaml

os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars, here and in the stage commands
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import postertune.fetch.engine as engine  # noqa: E402
from benchmarks.bench_fetch import free_port, poster_folder, serve, wait_for  # noqa: E402
from postertune.atomic import write_parquet, write_text  # noqa: E402
from postertune.dedupe.params import DedupeParams  # noqa: E402
from postertune.dedupe.run import duplicate_groups, mark_duplicates, read_fetched  # noqa: E402
from postertune.dedupe.run import run as dedupe  # noqa: E402
from postertune.fetch.params import FetchParams  # noqa: E402
from postertune.fetch.run import run as fetch  # noqa: E402
from postertune.imagefacts import ImageFacts, image_facts  # noqa: E402
from postertune.imagesafe import SWAPS_SIDES, WHITE, decode, dpi_of, load_image, open_image  # noqa: E402
from postertune.params import build  # noqa: E402
from postertune.store import ShardStore  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
QUALITY = 94
BATCH = 64


def verify_only(data: bytes, max_pixels: int, background: tuple[int, int, int]) -> ImageFacts:
    """The fetch stage's check before it measured more: decode at 1/8 scale, read size and dpi."""
    img = open_image(data, max_pixels)
    width, height = img.size
    fmt, dpi = str(img.format or "").upper(), dpi_of(img)
    _, orientation = decode(img, (max(1, width // 8), max(1, height // 8)), background)
    if orientation in SWAPS_SIDES:
        width, height = height, width
    return ImageFacts(width, height, fmt, dpi, None, "0" * 16)


_store: ShardStore | None = None


def _open_store(root: Path) -> None:
    global _store
    _store = ShardStore(root)
    len(_store)


def _hash_batch(shas: Sequence[str]) -> list[tuple[str, int]]:
    """Dedupe's hashing before fetch recorded it: draft decode of the stored bytes, then imagehash."""
    return [(sha, int(str(imagehash.phash(load_image(_store.read(sha), draft=(64, 64), background=WHITE))), 16))
            for sha in shas]  # fmt: skip


def hash_again(root: Path, shas: list[str]) -> dict[str, int]:
    batches = [shas[i : i + BATCH] for i in range(0, len(shas), BATCH)]
    workers = len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_open_store, initargs=(root,)) as pool:
        return {sha: value for batch in pool.map(_hash_batch, batches) for sha, value in batch}


def dedupe_decoding_again(params: DedupeParams) -> None:
    rows, _ = read_fetched(params.table)
    hashes = hash_again(params.shards, list(dict.fromkeys(rows["sha256"])))
    marked = mark_duplicates(rows, hashes, params)
    write_parquet(params.output / "images.parquet", marked)
    write_text(params.output / "groups.csv", duplicate_groups(marked).to_csv(index=False))


def stage_params(work: Path, urls: list[str], args: argparse.Namespace) -> tuple[FetchParams, DedupeParams]:
    table = work / "urls.csv"
    pd.DataFrame({"url": urls}).to_csv(table, index=False)
    fetch_params = build(FetchParams, fetch_section(work, table, args), "fetch")
    return fetch_params, DedupeParams(table=fetch_params.table, shards=fetch_params.shards, output=work / "dedup")


def fetch_section(work: Path, table: Path, args: argparse.Namespace) -> dict:
    return {
        "sources": [{"name": "bench", "kind": "table", "path": str(table), "url_column": "url"}],
        "source_dir": str(work),
        "allowed_schemes": ["http"],
        "allowed_networks": ["127.0.0.1/32"],
        "max_connections": args.max_connections,
        "max_connections_per_host": args.max_connections,
        "decode_workers": args.decode_workers,
        "shards": str(work / "shards"),
        "table": str(work / "images.parquet"),
    }


def in_process(urls: list[str], args: argparse.Namespace, one_decode: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-dedupe-"))
    try:
        fetch_params, dedupe_params = stage_params(work, urls, args)
        engine.image_facts = image_facts if one_decode else verify_only
        try:
            fetch(fetch_params)
        finally:
            engine.image_facts = image_facts
        (dedupe if one_decode else dedupe_decoding_again)(dedupe_params)
        check(work / "dedup" / "images.parquet", len(urls))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stage_commands(urls: list[str], args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-dedupe-"))
    try:
        table = work / "urls.csv"
        pd.DataFrame({"url": urls}).to_csv(table, index=False)
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        params["fetch"] = fetch_section(work, table, args)
        params["dedupe"].update(table=str(work / "images.parquet"), shards=str(work / "shards"), output="dedup")
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        for stage in ("fetch", "dedupe"):
            subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        check(work / "dedup" / "images.parquet", len(urls))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def decode_alone(payloads: list[bytes], workers: int) -> None:
    with ThreadPoolExecutor(workers) as decoders:
        facts = list(decoders.map(image_facts, payloads))
    assert len(facts) == len(payloads)


def img2dataset(urls: list[str], command: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-img2dataset-"))
    try:
        (work / "urls.txt").write_text("\n".join(urls) + "\n")
        subprocess.run(img2dataset_command(command, work), cwd=work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stats = [yaml.safe_load(p.read_text()) for p in (work / "out").glob("*_stats.json")]
        assert sum(s["successes"] for s in stats) == len(urls), stats
    finally:
        shutil.rmtree(work, ignore_errors=True)


def img2dataset_command(command: str, work: Path) -> list[str]:
    return [command, "--url_list", str(work / "urls.txt"), "--input_format", "txt", "--output_folder",
            str(work / "out"), "--output_format", "webdataset", "--processes_count", "2", "--thread_count", "64",
            "--disable_all_reencoding", "True", "--number_sample_per_shard", "2048"]  # fmt: skip


def check(marked: Path, count: int) -> None:
    table = pd.read_parquet(marked)
    assert len(table) == count and (table["status"] == "ok").all()


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (commands, hashing processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(work: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of ``work()`` (the server's CPU is not counted: it runs throughout)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    work()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="every method runs once per round; medians are shown")
    parser.add_argument("--max-connections", type=int, default=32)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--img2dataset", help="the img2dataset command (its own virtual environment)")
    args = parser.parse_args()

    folder = poster_folder(args.images, quality=QUALITY)
    paths = sorted(folder.glob("*.jpg"))
    sizes = [p.stat().st_size for p in paths]
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(folder, port), daemon=True)
    server.start()
    urls = [f"http://127.0.0.1:{port}/{p.name}" for p in paths]
    baseline, stages = "two decodes: verify in fetch, decode again in dedupe (baseline)", "one decode (the stages)"
    commands = "one decode: `python -m stages.fetch && python -m stages.dedupe`"
    payloads = [p.read_bytes() for p in paths]
    methods = {
        baseline: lambda: in_process(urls, args, one_decode=False),
        stages: lambda: in_process(urls, args, one_decode=True),
        commands: lambda: stage_commands(urls, args),
        f"the floor: the stages' decode alone, from memory, {args.decode_workers} threads": lambda: decode_alone(
            payloads, args.decode_workers
        ),
    }
    version = ""
    if args.img2dataset:
        version = subprocess.run([args.img2dataset.replace("bin/img2dataset", "bin/pip"), "show", "img2dataset"],
                                 capture_output=True, text=True).stdout.split("Version: ")[1].split()[0]  # fmt: skip
        methods[f"img2dataset {version}, 2 processes x 64 threads, no re-encoding (fetch alone)"] = lambda: img2dataset(
            urls, args.img2dataset
        )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    loads = []
    try:
        wait_for(urls[0])
        for _ in range(args.rounds):
            for name, method in methods.items():
                results[name].append(timed(method))
            loads.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.join()

    print(
        f"{args.images} posters, 600x900 JPEG quality {QUALITY}, {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB "
        f"(mean {np.mean(sizes) / 1e3:.0f} KB); {os.cpu_count()} cores, 1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f}; medians of {args.rounds} rounds\n"
    )
    print("| method | wall s | wall vs baseline | CPU ms/image | CPU vs baseline | wall s, each round |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rounds in results.items():
        wall = ratio(rounds, results[baseline], 0)
        cpu = ratio(rounds, results[baseline], 1)
        print(f"| {name} | {np.median([w for w, _ in rounds]):.1f} | {wall:.2f} "
              f"| {1000 * np.median([c for _, c in rounds]) / args.images:.2f} | {cpu:.2f} "
              f"| {', '.join(f'{w:.1f}' for w, _ in rounds)} |")  # fmt: skip
    if version:
        i2d = next(name for name in results if name.startswith("img2dataset"))
        print(f"\nstage commands (fetch + dedupe) / img2dataset (fetch alone): wall time "
              f"{ratio(results[commands], results[i2d], 0):.2f}, CPU time {ratio(results[commands], results[i2d], 1):.2f} "
              "(medians of the per-round ratios)")  # fmt: skip
        floor = next(name for name in results if name.startswith("the floor"))
        print(f"the decode alone / img2dataset (fetch alone): wall time {ratio(results[floor], results[i2d], 0):.2f}")
        print("img2dataset command:", " ".join(img2dataset_command(args.img2dataset, Path("WORK"))))


def ratio(rounds: list[tuple[float, float]], baseline: list[tuple[float, float]], column: int) -> float:
    """The median over rounds of ``rounds`` / ``baseline`` in ``column`` (0: wall, 1: CPU)."""
    return float(np.median([r[column] / b[column] for r, b in zip(rounds, baseline, strict=True)]))


if __name__ == "__main__":
    main()
