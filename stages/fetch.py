"""Stage fetch: read the poster sources, download their images into ``data/raw``."""

from __future__ import annotations

from pathlib import Path

from postertune.cli import run_stage
from postertune.fetch.params import FetchParams
from postertune.fetch.runner import run_fetch
from postertune.metrics import write_metrics
from postertune.params import section

SHARDS = Path("data/raw/shards")
TABLE = Path("data/raw/images.parquet")


def main() -> None:
    params = section(FetchParams, "fetch")
    write_metrics("fetch", run_fetch(params, SHARDS, TABLE))


if __name__ == "__main__":
    run_stage("fetch", main)
