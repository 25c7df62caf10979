"""`dvc push` of 100,000 images to an S3 endpoint on loopback: shards against loose files.

    python benchmarks/bench_dvc_push.py [--images 100000] [--loose-images 10000]

Runs moto's S3 server on 127.0.0.1, makes a temporary git + DVC repo per layout, tracks
the images with `dvc add`, and times `dvc push` (and `dvc status -c`, the remote
comparison a push starts with). The baseline, measured in the same run, is the same
kind of images as loose files (the layout DVC issues 7607 and 7681 describe as slow);
it is run on fewer images because it takes minutes, and reported per image.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic_images import write_loose, write_sharded  # noqa: E402

CREDS = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(layout: str, count: int, endpoint: str, env: dict[str, str]) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-push-{layout}-"))
    try:
        run(["git", "init", "-q"], work, env)
        run(["dvc", "init", "-q"], work, env)
        bucket = f"bench-{layout}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        run(["dvc", "remote", "add", "-d", "s3", f"s3://{bucket}/cache"], work, env)
        run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], work, env)
        data = work / "data" / "raw" / "shards"
        (write_sharded if layout == "shards" else write_loose)(data, count)
        files = sum(1 for _ in data.iterdir())
        add_s = run(["dvc", "add", "data/raw/shards"], work, env)
        push_s = run(["dvc", "push"], work, env)
        status_s = run(["dvc", "status", "-c"], work, env)
        return dict(images=count, files=files, add_s=add_s, push_s=push_s, status_cloud_s=status_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--loose-images", type=int, default=10_000)
    args = parser.parse_args()

    os.environ.update(CREDS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        shards = measure("shards", args.images, endpoint, env)
        loose = measure("loose", args.loose_images, endpoint, env)
    finally:
        server.stop()
    print(
        f"{'layout':8} {'images':>8} {'files':>7} {'dvc add s':>10} {'dvc push s':>11} {'status -c s':>12} {'push ms/image':>14}"
    )
    for name, r in [("shards", shards), ("loose", loose)]:
        print(
            f"{name:8} {r['images']:8d} {r['files']:7d} {r['add_s']:10.1f} {r['push_s']:11.1f} "
            f"{r['status_cloud_s']:12.1f} {1000 * r['push_s'] / r['images']:14.3f}"
        )
    ratio = (loose["push_s"] / loose["images"]) / (shards["push_s"] / shards["images"])
    print(f"push time per image: shards are {ratio:.1f}x faster than loose files")


if __name__ == "__main__":
    main()
