"""Stage fetch: read the poster sources, download or read every image into the shard store."""

from postertune.cli import run_stage
from postertune.fetch.params import FetchParams
from postertune.fetch.run import run

if __name__ == "__main__":
    run_stage("fetch", FetchParams, run)
