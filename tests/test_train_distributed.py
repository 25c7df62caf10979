"""Data-parallel training: two CPU processes under ``accelerate launch`` (gloo) train the same
weights as one process with the same global batch, the U-Net alone or with per-block rates and
both text encoders.

By hand, on a machine without GPUs: ``accelerate launch --multi_gpu --num_processes 2 -m stages.train``
(``--cpu`` would start a single process; the stage itself asks accelerate for the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from postertune.train.params import load_train_params
from postertune.train.run import run as train
from tests.launching import launch
from tests.train_inputs import fresh_process_state, write_dataset, write_params

pytestmark = pytest.mark.slow

SIZES = [(200, 300), (300, 300), (200, 300), (300, 300), (200, 300), (300, 300)]
RECIPE = dict(
    max_train_steps=4,
    shuffle_caption=True,
    keep_tokens=1,
    caption_dropout_rate=0.3,
    long_caption_ratio=0.5,
    noise_offset=0.05,
    validation={"split": 1},
    # Some gradients are pure rounding noise (a bias right before a one-channel group norm is
    # cancelled exactly); Adam's default eps 1e-8 would blow that noise up to full-size steps whose
    # sign depends on summation order. A larger eps leaves real gradients alone and noise tiny.
    optimizer_args={"eps": 1.0e-6},
)
BLOCKS_AND_TEXT = dict(block_lr=[1.0] * 22 + [0.5], train_text_encoder=True, learning_rate_te1=5e-4)


def launch_two_processes(folder: Path) -> dict:
    """The stage re-launched by itself under ``accelerate launch`` with the shipped multi-GPU config,
    two processes: on a machine without CUDA they are CPU workers on the gloo backend."""
    launch("train", folder)
    return json.loads((folder / "metrics/train.json").read_text())


@pytest.mark.usefixtures(fresh_process_state.__name__)
@pytest.mark.parametrize("extra", [{}, BLOCKS_AND_TEXT], ids=["unet", "blocks-and-text-encoders"])
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(tmp_path, monkeypatch, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, batch in ((one, 4), (two, 2)):
        folder.mkdir()
        write_dataset(folder, SIZES)
        write_params(folder, batch_size=batch, **RECIPE, **extra)

    double = launch_two_processes(two)
    monkeypatch.chdir(one)
    single = train(load_train_params(one / "params.yaml"))

    assert single["images_seen"] == double["images_seen"] == 4 * 4
    assert double["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    a = load_file(one / "models/unet/diffusion_pytorch_model.safetensors")
    b = load_file(two / "models/unet/diffusion_pytorch_model.safetensors")
    base = load_file(one / "models/base/unet/diffusion_pytorch_model.safetensors")
    # Each step moves a weight by up to lr = 1e-3; a batch split wrongly would differ by that much.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=5e-5, msg=key)
        assert not torch.equal(a[key], base[key]), key
    difference = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    update = sum((a[k] - base[k]).norm() ** 2 for k in a) ** 0.5
    assert difference < 1e-3 * update
    encoders = sorted(p.relative_to(one) for p in (one / "models/text_encoders").glob("*/model.safetensors"))
    assert len(encoders) == (2 if extra else 0)
    for path in encoders:  # gradients of the text encoders are averaged across processes too
        a, b = load_file(one / path), load_file(two / path)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=5e-5, msg=f"{path}: {key}")
