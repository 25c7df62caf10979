"""Stage sample: render every prompt with every model, same seeds, and a grid per prompt."""

from postertune.cli import run_stage
from postertune.launch import relaunched
from postertune.sample.params import SampleParams
from postertune.sample.run import run

if __name__ == "__main__":
    run_stage("sample", SampleParams, relaunched("sample", run))
