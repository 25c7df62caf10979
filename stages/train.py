"""Train stage: fully fine-tune the SDXL U-Net on the captioned posters.

Run directly (``python -m stages.train``) or on several GPUs or nodes with
``accelerate launch --config_file configs/accelerate/<setup>.yaml -m stages.train``.
"""

from __future__ import annotations

import logging

from postertune.cli import run_stage
from postertune.metrics import write_metrics
from postertune.train.config import load_train_params


def main() -> None:
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("postertune").setLevel(logging.INFO)
    params = load_train_params()
    from postertune.train.loop import train  # the heavy imports wait until the params are known good

    metrics = train(params)
    if metrics is not None:
        write_metrics("train", metrics)


if __name__ == "__main__":
    run_stage("train", main)
