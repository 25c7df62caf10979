"""Stage caption: one short caption, one long caption and a tag list per kept image."""

from postertune.caption.params import CaptionParams
from postertune.caption.run import run
from postertune.cli import run_stage
from postertune.launch import relaunched

if __name__ == "__main__":
    run_stage("caption", CaptionParams, relaunched("caption", run))
