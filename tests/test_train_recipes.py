"""Every recipe the project ships trains: the U-Net moves by the scheduled amount at every step,
the loss on the training image falls, and a run resumed mid-warmup ends where an uninterrupted
run ends.

A recipe is each profile in ``conf/`` (its optimizer, schedule, precision and memory settings on
the tiny model) and each optimizer × {fused, not fused} × schedule with warmup. Only sizes,
counts and the learning rate (the tiny model learns at 1e-3) are scaled down.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import io
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from postertune.store import ShardWriter, sha256_hex
from postertune.train.optim import make_lr_scheduler, make_optimizer
from postertune.train.params import TrainParams, load_train_params
from postertune.train.run import run as train
from tests.profiles import composed_params
from tests.train_inputs import fresh_process_state, poster_bytes, write_params

pytestmark = pytest.mark.usefixtures(fresh_process_state.__name__)
PROJECT = Path(__file__).resolve().parents[1]

STEPS, WARMUP, RESUME_AT = 6, 3, 2  # step 2 lies inside the warmup
LEARNING_RATE = 1e-3
ADAFACTOR_ARGS = {"relative_step": False, "scale_parameter": False, "warmup_init": False, "clip_threshold": 1.0}
WARMUP_SCHEDULES = ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# what a profile may set that the tiny test data cannot take as is
SCALED = dict(
    base="tiny",
    vae=None,
    captions="captions.parquet",
    shards="shards",
    resolution=64,
    bucket_step=32,
    min_bucket_reso=32,
    max_bucket_reso=192,
    batch_size=1,
    max_train_steps=STEPS,
    validation={"split": 1, "every_n_steps": 0},
    samples={"every_n_steps": 0},
    checkpoints={"every_n_steps": 1, "total_limit": STEPS},
    dataloader_num_workers=0,
)


def profile_recipe(profile: str) -> dict:
    """The train section of a profile as ``dvc exp run -S profile=…`` composes it, scaled to the tiny model."""
    section = composed_params(profile)["train"]
    section.update(SCALED)
    if section["learning_rate"] is not None:
        section["learning_rate"] = LEARNING_RATE
    if section["lr_warmup_steps"]:
        section["lr_warmup_steps"] = WARMUP
    return section


def matrix_recipe(optimizer: str, fused: bool, schedule: str) -> dict:
    recipe = dict(SCALED, learning_rate=LEARNING_RATE, lr_scheduler=schedule, lr_warmup_steps=WARMUP)
    recipe.update(optimizer=optimizer, fused_backward_pass=fused, snr_gamma=5.0, noise_offset=0.05)
    if optimizer == "Adafactor":
        recipe.update(optimizer_args=ADAFACTOR_ARGS, max_grad_norm=0.0)
    else:
        recipe.update(optimizer_args={"weight_decay": 0.01}, max_grad_norm=1.0)
    return recipe


PROFILES = ["demo"] + sorted(p.stem for p in (PROJECT / "conf/profile").glob("*.yaml"))
RECIPES = {f"profile-{name}": profile_recipe(name) for name in PROFILES}
for _schedule in WARMUP_SCHEDULES:
    RECIPES[f"AdamW-{_schedule}"] = matrix_recipe("AdamW", False, _schedule)
    RECIPES[f"Adafactor-{_schedule}"] = matrix_recipe("Adafactor", False, _schedule)
    RECIPES[f"Adafactor-fused-{_schedule}"] = matrix_recipe("Adafactor", True, _schedule)
# Adafactor sizing its own steps (relative_step), fused into backward; its warmup_init would take
# thousands of steps to move the loss, so the test takes the schedule without it
RECIPES["Adafactor-relative-fused"] = dict(
    SCALED,
    learning_rate=None,
    lr_scheduler="adafactor",
    lr_warmup_steps=0,
    optimizer="Adafactor",
    optimizer_args={"relative_step": True, "scale_parameter": True, "warmup_init": False},
    fused_backward_pass=True,
    max_grad_norm=0.0,
)
RECIPES["AdamW8bit-constant_with_warmup"] = matrix_recipe("AdamW8bit", False, "constant_with_warmup")
NEEDS_CUDA = {"AdamW8bit-constant_with_warmup"}


def recipe_cases() -> list:
    runs_here = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    skip = pytest.mark.skipif(not runs_here, reason="AdamW8bit runs on CUDA with bitsandbytes only")
    return [pytest.param(name, marks=[skip] if name in NEEDS_CUDA else []) for name in RECIPES]


def write_twin_posters(folder: Path) -> None:
    """One poster to train on and, held out for the validation loss, a copy differing in one pixel:
    the validation loss then measures how well the model fits its training image."""
    original = poster_bytes(7, 200, 300)
    image = Image.open(io.BytesIO(original)).convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    rows = []
    with ShardWriter(folder / "shards") as writer:
        for data in (original, buffer.getvalue()):
            sha = sha256_hex(data)
            writer.add(sha, data)
            caption = "movie poster, thriller, bold title, dark"
            rows.append(dict(sha256=sha, caption=caption, caption_long=caption, tags=caption.split(", "),
                             width=200, height=300, title="Film"))  # fmt: skip
    pd.DataFrame(rows).to_parquet(folder / "captions.parquet", index=False)


def checkpoint_weights(folder: Path) -> list[dict[str, torch.Tensor]]:
    """The U-Net before training and after each step, from the base folder and the checkpoints."""
    weights = [load_file(folder / "models/base/unet/diffusion_pytorch_model.safetensors")]
    steps = sorted((folder / "models/checkpoints").glob("*/step-*"))
    assert [p.name for p in steps] == [f"step-{s:07d}" for s in range(1, STEPS + 1)]
    return weights + [load_file(p / "model.safetensors") for p in steps]


def scheduled_learning_rates(params: TrainParams) -> list[float]:
    """The learning rate each step should train with, from the schedule alone."""
    optimizer = make_optimizer(params, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = make_lr_scheduler(params, optimizer)
    rates = []
    for _ in range(params.max_train_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # a no-op (no gradient) that keeps the scheduler's call order
        scheduler.step()
    return rates


def update_rms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    squares = sum((after[k].double() - before[k].double()).pow(2).sum().item() for k in before)
    return math.sqrt(squares / sum(t.numel() for t in before.values()))


def val_losses(folder: Path) -> list[float]:
    table = pd.read_csv(folder / "dvclive/train/plots/metrics/val/loss.tsv", sep="\t")
    return table["loss"].tolist()


@pytest.mark.parametrize("name", recipe_cases())
def test_recipe_trains_by_its_schedule_and_resumes_mid_warmup(tmp_path, monkeypatch, name):
    recipe = RECIPES[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        folder.mkdir()
        write_twin_posters(folder)
        write_params(folder, **recipe)
    params = load_train_params(straight / "params.yaml")

    monkeypatch.chdir(straight)
    train(params)
    weights = checkpoint_weights(straight)

    # every tensor moved; each step moved the weights in proportion to its scheduled learning rate
    assert [k for k in weights[0] if torch.equal(weights[0][k], weights[-1][k])] == []
    steps = [update_rms(a, b) for a, b in zip(weights, weights[1:], strict=False)]
    if params.lr_scheduler == "adafactor":  # Adafactor sizes each step itself: only "it moved"
        assert all(size > 0 for size in steps)
    else:
        rates = scheduled_learning_rates(params)
        for step, (size, rate) in enumerate(zip(steps, rates, strict=True), start=1):
            if rate == 0:
                assert size == 0, f"step {step} moved the weights at learning rate 0"
            else:  # Adam's and clipped Adafactor's unit updates have an RMS of about 1
                assert 0.2 < size / rate < 1.5, f"step {step}: update RMS {size:.3g} at learning rate {rate:.3g}"

    # over-fitting one poster: the loss on (a one-pixel copy of) it falls
    losses = val_losses(straight)
    assert losses[-1] < 0.9 * losses[0], losses

    # killed after a step inside the warmup, the run resumes there and ends bit for bit the same
    monkeypatch.chdir(resumed)
    shutil.copytree(straight / "models/cache", resumed / "models/cache")
    (checkpoints,) = (straight / "models/checkpoints").iterdir()
    kept = resumed / "models/checkpoints" / checkpoints.name
    kept.mkdir(parents=True)
    shutil.copy2(checkpoints / "run.json", kept / "run.json")
    shutil.copytree(checkpoints / f"step-{RESUME_AT:07d}", kept / f"step-{RESUME_AT:07d}")
    metrics = train(load_train_params(resumed / "params.yaml"))
    assert metrics["steps"] == STEPS
    final = load_file(kept / f"step-{STEPS:07d}" / "model.safetensors")
    assert [k for k in final if not torch.equal(final[k], weights[-1][k])] == []


# a constant and a decaying schedule: every schedule's fused steps are held to it by the test above
@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine_with_restarts"])
def test_fused_adafactor_trains_exactly_as_unfused(tmp_path, monkeypatch, schedule):
    """Stepping each weight inside backward is the same math as stepping after it."""
    final = {}
    for fused in (False, True):
        folder = tmp_path / str(fused)
        folder.mkdir()
        write_twin_posters(folder)
        write_params(folder, **{**matrix_recipe("Adafactor", fused, schedule), "checkpoints": {"every_n_steps": 0}})
        monkeypatch.chdir(folder)
        train(load_train_params(folder / "params.yaml"))
        final[fused] = load_file(folder / "models/unet/diffusion_pytorch_model.safetensors")
    assert [k for k in final[False] if not torch.equal(final[False][k], final[True][k])] == []
