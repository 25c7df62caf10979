"""Train stage: fully fine-tune the SDXL U-Net on the captioned posters.

``python -m stages.train`` trains in this process (CPU or one GPU). For several GPUs or
nodes, either launch it yourself,
``accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m stages.train``,
or set ``POSTERTUNE_ACCELERATE_CONFIG`` to an accelerate config: the stage then
re-launches itself under ``accelerate launch`` with it (how ``dvc repro`` and
``dvc exp run`` reach many GPUs).
"""

from __future__ import annotations

import logging

from postertune.cli import run_stage
from postertune.launch import relaunched
from postertune.train.params import TrainParams


def train(params: TrainParams) -> dict | None:
    from postertune.train.run import run  # the heavy imports wait until the params are known good

    return run(params)


if __name__ == "__main__":
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("postertune").setLevel(logging.INFO)
    run_stage("train", TrainParams, relaunched("train", train))
