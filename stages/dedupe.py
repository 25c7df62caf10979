"""Stage dedupe: mark exact and near-duplicate posters in the fetched table."""

from postertune.cli import run_stage
from postertune.dedupe.params import DedupeParams
from postertune.dedupe.run import run

if __name__ == "__main__":
    run_stage("dedupe", DedupeParams, run)
