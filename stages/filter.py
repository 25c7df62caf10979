"""filter: keep the deduplicated images that pass the guide's quality rules (see postertune.filtering)."""

from postertune.cli import run_stage
from postertune.filtering import FilterParams, run_filter
from postertune.metrics import write_metrics
from postertune.params import section


def main() -> None:
    params = section(FilterParams, "filter")
    write_metrics("filter", run_filter(params))


if __name__ == "__main__":
    run_stage("filter", main)
