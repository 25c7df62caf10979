"""Stage evaluate: score every sampled image, summarise per model, compare the candidate."""

from postertune.cli import run_stage
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.run import run
from postertune.launch import relaunched

if __name__ == "__main__":
    run_stage("evaluate", EvaluateParams, relaunched("evaluate", run))
