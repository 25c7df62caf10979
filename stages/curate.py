"""Stage curate: score the captioned set (aesthetic, caption similarity, JPEG quality) and keep the best."""

from postertune.cli import run_stage
from postertune.curate.params import CurateParams
from postertune.curate.run import run
from postertune.launch import relaunched

if __name__ == "__main__":
    run_stage("curate", CurateParams, relaunched("curate", run))
