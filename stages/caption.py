"""Stage caption: one short caption, one long caption and a tag list per kept image."""

from postertune.caption.params import CaptionParams
from postertune.caption.run import run
from postertune.cli import run_stage

if __name__ == "__main__":
    run_stage("caption", CaptionParams, run)
