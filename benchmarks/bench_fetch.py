"""Fetch throughput: images/s from a loopback HTTP server through the real fetch stage code.

    python benchmarks/bench_fetch.py [--images 2000] [--max-connections-per-host 32]

Draws synthetic 600x900 JPEG posters (about 50-150 KB, cached under the system temp
folder), serves them from memory with aiohttp in a separate process on 127.0.0.1, and
times the fetch stage's ``run`` (sources, downloads, decode checks, shards, journal, table) on a
fresh store. The baseline, measured in the same run on the same images, is the guide's
approach: a sequential loop that downloads each image with ``urllib`` and decodes it
(once fully with Pillow, as a naive script would, and once with the same
``image_facts`` check the stage uses, to isolate the gain from concurrency).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from postertune.fetch.params import FetchParams  # noqa: E402
from postertune.fetch.run import run  # noqa: E402
from postertune.imagefacts import image_facts  # noqa: E402
from postertune.params import build  # noqa: E402
from postertune.store import sha256_hex  # noqa: E402

WIDTH, HEIGHT = 600, 900


def draw_posters(task: tuple[int, int, int, int]) -> list[bytes]:
    """Posters ``start`` .. ``stop`` - 1 (JPEG ``quality``): a colour gradient, film grain and flat panels."""
    start, stop, seed, quality = task
    rng = np.random.default_rng([seed, start])
    grain = rng.normal(0, 1, (HEIGHT * 2, WIDTH * 2, 3)).astype(np.float32)
    y = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, WIDTH, dtype=np.float32)[None, :, None]
    posters = []
    for _ in range(start, stop):
        top, bottom, side = rng.random((3, 3), dtype=np.float32) * 255
        oy, ox = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
        pixels = top * (1 - y) + bottom * y * x + side * (1 - x) * y * 0.5
        pixels += rng.uniform(4, 14) * grain[oy : oy + HEIGHT, ox : ox + WIDTH]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
            size = rng.integers(20, 200, 2)
            draw.rectangle([x0, y0, x0 + int(size[0]), y0 + int(size[1])], fill=tuple(rng.integers(0, 256, 3).tolist()))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        posters.append(buf.getvalue())
    return posters


def poster_folder(count: int, seed: int = 0, quality: int = 85) -> Path:
    suffix = "" if quality == 85 else f"-q{quality}"
    folder = Path(tempfile.gettempdir()) / f"postertune-bench-fetch-{count}-{seed}{suffix}"
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(i, min(i + 100, count), seed, quality) for i in range(0, count, 100)]
    with multiprocessing.Pool() as pool:
        for (start, *_), posters in zip(tasks, pool.map(draw_posters, tasks), strict=True):
            for i, data in enumerate(posters, start):
                (folder / f"{i:06d}.jpg").write_bytes(data)
    return folder


def serve(folder: Path, port: int) -> None:
    """A fast server: every image in memory, no access log."""
    from aiohttp import web

    images = {p.name: p.read_bytes() for p in folder.glob("*.jpg")}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=images[request.match_info["name"]], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process, all its threads
    return usage.ru_utime + usage.ru_stime


def server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measured(count: int, work: Callable[[], None], server_pid: int) -> tuple[float, float, float]:
    """Run ``work``; return images/s and the client's and server's CPU milliseconds per image."""
    cpu, server, start = cpu_seconds(), server_cpu_seconds(server_pid), time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    client_ms = 1000 * (cpu_seconds() - cpu) / count
    return count / seconds, client_ms, 1000 * (server_cpu_seconds(server_pid) - server) / count


def naive_loop(urls: list[str], check: Callable[[bytes], object]) -> None:
    """The guide's way: one image after the other, download then decode."""
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
        check(data)
        sha256_hex(data)


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def stage_run(urls: list[str], work: Path, overrides: dict) -> None:
    """The fetch stage's own code path on a fresh store in ``work``."""
    table = work / "urls.csv"
    pd.DataFrame({"url": urls}).to_csv(table, index=False)
    raw = {"sources": [{"name": "bench", "kind": "table", "path": str(table), "url_column": "url"}]}
    params = build(FetchParams, raw | {"allowed_schemes": ["http"], **overrides}, "fetch")
    run(replace(params, shards=work / "shards", table=work / "images.parquet"))
    fetched = pd.read_parquet(work / "images.parquet")
    assert (fetched["status"] == "ok").all(), fetched["reason"].value_counts()


def fresh_stage_run(urls: list[str], overrides: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    try:
        stage_run(urls, work, overrides)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="every method runs once per round; medians are shown")
    parser.add_argument("--max-connections", type=int, default=32)
    parser.add_argument("--max-connections-per-host", type=int, default=32)
    parser.add_argument("--decode-workers", type=int, default=2)
    args = parser.parse_args()

    folder = poster_folder(args.images)
    paths = sorted(folder.glob("*.jpg"))
    sizes = [p.stat().st_size for p in paths]
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(folder, port), daemon=True)
    server.start()
    urls = [f"http://127.0.0.1:{port}/{p.name}" for p in paths]
    overrides = {
        "max_connections": args.max_connections,
        "max_connections_per_host": args.max_connections_per_host,
        "decode_workers": args.decode_workers,
    }
    baseline = "sequential urllib + full Pillow decode (baseline)"
    methods = {
        baseline: partial(naive_loop, urls, full_decode),
        "sequential urllib + image_facts (draft decode)": partial(naive_loop, urls, image_facts),
        f"fetch stage (run, {args.max_connections} conn, {args.max_connections_per_host}/host, "
        f"{args.decode_workers} decoders)": partial(fresh_stage_run, urls, overrides),
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in methods}
    loads = []
    try:
        wait_for(urls[0])
        # methods take turns within each round, so a burst of load elsewhere hits them alike
        for _ in range(args.rounds):
            for name, method in methods.items():
                results[name].append(measured(len(urls), method, server.pid))
            loads.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.join()

    print(
        f"{args.images} posters, {WIDTH}x{HEIGHT} JPEG, {min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB "
        f"(mean {np.mean(sizes) / 1e3:.0f} KB); {os.cpu_count()} cores, 1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f}; medians of {args.rounds} rounds\n"
    )
    print("| method | images/s | vs baseline | CPU ms/image, client + server | images/s on idle cores | each round |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rounds in results.items():
        rates = [rate for rate, _, _ in rounds]
        ratios = [rate / base for rate, (base, _, _) in zip(rates, results[baseline], strict=True)]
        client_ms, server_ms = (float(np.median([r[i] for r in rounds])) for i in (1, 2))
        # a sequential loop keeps one core busy at a time (client, then server); the stage all of them
        cores = (os.cpu_count() or 1) if name.startswith("fetch stage") else 1
        every = ", ".join(f"{r:.0f}" for r in rates)
        print(
            f"| {name} | {np.median(rates):.0f} | {np.median(ratios):.1f}x | {client_ms:.2f} + {server_ms:.2f} "
            f"| {cores * 1000 / (client_ms + server_ms):.0f} | {every} |"
        )


if __name__ == "__main__":
    main()
