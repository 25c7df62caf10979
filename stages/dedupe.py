"""dedupe: mark exact and near-duplicate posters in the fetched table (see postertune.dedupe)."""

from postertune.cli import run_stage
from postertune.dedupe.table import DedupeParams, run_dedupe
from postertune.metrics import write_metrics
from postertune.params import section


def main() -> None:
    params = section(DedupeParams, "dedupe")
    write_metrics("dedupe", run_dedupe(params))


if __name__ == "__main__":
    run_stage("dedupe", main)
