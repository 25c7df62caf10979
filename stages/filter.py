"""Stage filter: keep the deduplicated images that pass the guide's quality rules."""

from postertune.cli import run_stage
from postertune.filter.params import FilterParams
from postertune.filter.run import run

if __name__ == "__main__":
    run_stage("filter", FilterParams, run)
