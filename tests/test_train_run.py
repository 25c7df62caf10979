"""The train stage end to end on the tiny SDXL model, on CPU: learning, outputs, resume,
failures, lean mode. Each test trains for a few steps in a temp folder of its own."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from postertune.errors import PipelineError
from postertune.models.single_file import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_l_to_original,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)
from postertune.models.tiny import build_tiny_pipeline
from postertune.params import ParamError
from postertune.train.packed import PackedTensors
from postertune.train.params import load_train_params
from postertune.train.run import run as train
from tests.train_inputs import fresh_process_state, write_dataset, write_params

PORTRAIT, SQUARE = (200, 300), (300, 300)
PHASES = ("load", "cache", "train", "checkpoint", "save")  # metrics/train.json has a peak memory for each
pytestmark = pytest.mark.usefixtures(fresh_process_state.__name__)
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(folder: Path, **overrides) -> dict:
    write_params(folder, **overrides)
    return train(load_train_params(folder / "params.yaml"))


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def curve(folder: Path, name: str) -> list[tuple[int, float]]:
    with (folder / "dvclive/train/plots/metrics" / f"{name}.tsv").open() as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]


def test_training_a_few_posters_lowers_the_loss_and_writes_every_output(workdir):
    write_dataset(workdir, [PORTRAIT, SQUARE, PORTRAIT, SQUARE, PORTRAIT])
    metrics = run(
        workdir,
        max_train_steps=40,
        validation={"split": 1, "every_n_steps": 20},
        samples={"every_n_steps": 20, "prompts": ["movie poster, genre1, bold letters"], "steps": 2},
        checkpoints={"every_n_steps": 20},
    )

    losses = [value for _, value in curve(workdir, "train/loss")]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    val = curve(workdir, "val/loss")
    assert [s for s, _ in val] == [0, 20, 40] and val[-1][1] < val[0][1]
    for name in ("train/lr", "train/grad_norm", "train/images_per_s", "train/peak_memory_mb"):
        assert len(curve(workdir, name)) == 40, name
    assert metrics["steps"] == 40 and metrics["images_seen"] == 80
    assert metrics["val_loss"] == pytest.approx(val[-1][1]) and metrics["train_loss"] == pytest.approx(losses[-1])
    assert metrics["images_per_s"] > 0 and metrics["peak_memory_mb"] > 0

    # every U-Net weight trained; the saved folder loads into the base pipeline and renders
    base, tuned = unet_weights(workdir / "models/base/unet"), unet_weights(workdir / "models/unet")
    assert base.keys() == tuned.keys()
    assert [k for k in base if torch.equal(base[k], tuned[k])] == []
    assert metrics["trainable_params"] == sum(t.numel() for t in tuned.values())
    unet = UNet2DConditionModel.from_pretrained(workdir / "models/unet")
    pipe = StableDiffusionXLPipeline.from_pretrained(workdir / "models/base", unet=unet)
    image = pipe("movie poster", num_inference_steps=2, width=64, height=128, output_type="pil").images[0]
    assert image.size == (64, 128)

    # the single file holds the same U-Net in the original key layout
    original = unet_to_original(unet)
    with safe_open(workdir / "models/sdxl-poster.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {UNET_PREFIX + k for k in original} <= keys
        for key in list(original)[:20]:
            assert torch.equal(f.get_tensor(UNET_PREFIX + key), original[key])

    # samples logged as images every 20 steps, in the poster bucket
    images = sorted((workdir / "dvclive/train/plots/images/prompt-0").iterdir())
    assert [p.name for p in images] == ["0000020.png", "0000040.png"]
    # latents for all 5 images; text embeddings cached once per training caption (nothing augmented);
    # each cache one shard
    (latents,), (texts,) = ((workdir / "models/cache" / kind).iterdir() for kind in ("latents", "text"))
    assert len(PackedTensors(latents)) == 5 and len(PackedTensors(texts)) == 4
    assert len(list((workdir / "models/cache").rglob("*.safetensors"))) == 2
    steps = sorted(p.name for p in (workdir / "models/checkpoints").glob("*/step-*"))
    assert steps == ["step-0000020", "step-0000040"]


RESUMABLE = dict(
    max_train_steps=6,
    gradient_accumulation_steps=2,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=2,
    use_ema=True,
    ema_decay=0.9,
    shuffle_caption=True,
    keep_tokens=1,
    caption_dropout_rate=0.25,
    long_caption_ratio=0.5,
    validation={"split": 1, "every_n_steps": 2},
    checkpoints={"every_n_steps": 2, "total_limit": 2},
)


def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    sizes = [PORTRAIT, SQUARE, PORTRAIT, SQUARE, PORTRAIT]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        folder.mkdir()
        write_dataset(folder, sizes)

    monkeypatch.chdir(straight)
    expected = run(straight, **RESUMABLE)

    monkeypatch.chdir(resumed)
    run(resumed, **{**RESUMABLE, "max_train_steps": 3})  # stops after step 3, as if killed there
    latents = {p: p.stat().st_mtime_ns for p in (resumed / "models/cache").rglob("*.safetensors")}
    got = run(resumed, **RESUMABLE)

    a, b = unet_weights(straight / "models/unet"), unet_weights(resumed / "models/unet")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert got["val_loss"] == expected["val_loss"] and got["train_loss"] == expected["train_loss"]
    assert got["images_seen"] == expected["images_seen"] == 6 * 2 * 2
    # one curve, as if never interrupted: the resumed run continued the interrupted run's log
    # (which also holds the validation that closed the interrupted run at step 3)
    assert curve(resumed, "train/loss") == curve(straight, "train/loss")
    assert [point for point in curve(resumed, "val/loss") if point[0] != 3] == curve(straight, "val/loss")
    # the cache was reused, not rebuilt; only the newest checkpoints are kept
    assert {p: p.stat().st_mtime_ns for p in (resumed / "models/cache").rglob("*.safetensors")} == latents
    kept = sorted(p.name for p in (resumed / "models/checkpoints").glob("*/step-*"))
    assert kept == ["step-0000004", "step-0000006"]


def test_data_loader_workers_train_the_weights_of_the_main_process(tmp_path, monkeypatch):
    """Data-loader workers (started from a fresh server, so that they share no memory with the
    model) draw exactly the batches the main process would."""
    runs = {}
    for workers in (0, 2):
        folder = tmp_path / f"workers-{workers}"
        folder.mkdir()
        write_dataset(folder, [PORTRAIT, SQUARE, PORTRAIT])
        monkeypatch.chdir(folder)
        runs[workers] = run(folder, **{**RESUMABLE, "max_train_steps": 2, "dataloader_num_workers": workers})
    a, b = unet_weights(tmp_path / "workers-0/models/unet"), unet_weights(tmp_path / "workers-2/models/unet")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert runs[0]["train_loss"] == runs[2]["train_loss"]


def test_only_a_checkpoint_of_the_same_recipe_is_resumed(workdir):
    write_dataset(workdir, [PORTRAIT, SQUARE, PORTRAIT])
    first = run(workdir, max_train_steps=3)
    # the same recipe (a constant schedule does not depend on the step count): nothing left to train
    again = run(workdir, max_train_steps=2)
    assert again["steps"] == 3 and again["images_per_s"] == 0.0 and again["train_loss"] == first["train_loss"]
    assert len(curve(workdir, "train/loss")) == 3
    fresh = run(workdir, max_train_steps=2, checkpoints={"resume": "never"})
    assert fresh["steps"] == 2 and fresh["images_seen"] == 4
    changed = run(workdir, max_train_steps=2, learning_rate=2e-3)  # another recipe: from the start
    assert changed["steps"] == 2 and len(list((workdir / "models/checkpoints").iterdir())) == 2


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(workdir, caplog):
    write_dataset(workdir, [PORTRAIT, SQUARE])
    every_step = {"every_n_steps": 1, "total_limit": 3}
    run(workdir, max_train_steps=3, checkpoints=every_step)
    (checkpoints,) = (workdir / "models/checkpoints").iterdir()
    weights = checkpoints / "step-0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short

    with caplog.at_level(logging.WARNING):
        again = run(workdir, max_train_steps=3, checkpoints=every_step)
    where = checkpoints.relative_to(workdir) / "step-0000003"
    assert f"checkpoint {where} is damaged (model.safetensors: Error while deserializing header" in caplog.text
    assert again["steps"] == 3 and again["images_seen"] == 6  # steps 1-2 restored, step 3 trained again
    assert len(curve(workdir, "train/loss")) == 3
    with safe_open(weights, "pt") as f:  # the step is written whole again
        assert len(list(f.keys())) > 0


def test_nan_loss_stops_at_its_step_and_keeps_earlier_checkpoints(workdir):
    write_dataset(workdir, [PORTRAIT, SQUARE])
    with pytest.raises(PipelineError) as caught:
        run(workdir, max_train_steps=20, learning_rate=1.0e4, max_grad_norm=0.0, checkpoints={"every_n_steps": 1})
    message = str(caught.value)
    assert "\n" not in message
    assert "loss is nan at step 2" in message
    assert "fp16-fix VAE" in message and "train.learning_rate" in message
    assert [p.name for p in (workdir / "models/checkpoints").glob("*/step-*")] == ["step-0000001"]


def test_lean_mode_adafactor_fused_into_backward_in_bf16(workdir):
    write_dataset(workdir, [PORTRAIT, SQUARE])
    metrics = run(
        workdir,
        max_train_steps=3,
        mixed_precision="bf16",
        full_bf16=True,
        save_precision="bf16",
        optimizer="Adafactor",
        learning_rate=1e-3,
        optimizer_args={"relative_step": False, "scale_parameter": False, "clip_threshold": 1.0},
        fused_backward_pass=True,
        max_grad_norm=0.0,
        gradient_checkpointing=True,
        channels_last=True,
    )
    assert metrics["steps"] == 3
    base, tuned = unet_weights(workdir / "models/base/unet"), unet_weights(workdir / "models/unet")
    assert all(t.dtype == torch.bfloat16 for t in tuned.values())
    unchanged = [k for k in base if torch.equal(base[k].to(torch.bfloat16), tuned[k])]
    # Norm scales sit at 1.0, where bf16 steps are 2^-7: updates of ~1e-3 round away (the price of
    # lean mode). Every other tensor moved, each stepped inside backward.
    assert all(".norm" in k or k.startswith("conv_norm_out") for k in unchanged)
    assert all(k.endswith(".weight") for k in unchanged)


def test_outputs_carry_the_bases_frozen_weights_whatever_dtype_training_held_them_in(workdir):
    """Nothing after caching uses the VAE or text encoders here (fixed captions, no samples), so training
    frees them; the single file is written with the base's own, loaded again in fp16, not with
    the bf16 copies training computed with. Memory is reported per phase."""
    write_dataset(workdir, [PORTRAIT, SQUARE])
    metrics = run(workdir, max_train_steps=2, mixed_precision="bf16", save_precision="fp16")

    base = build_tiny_pipeline(seed=0)
    frozen = {
        VAE_PREFIX: vae_to_original(base.vae),
        CLIP_L_PREFIX: clip_l_to_original(base.text_encoder),
        OPEN_CLIP_PREFIX: open_clip_to_original(base.text_encoder_2),
    }
    with safe_open(workdir / "models/sdxl-poster.safetensors", "pt") as f:
        for prefix, tensors in frozen.items():
            for key, tensor in tensors.items():
                assert torch.equal(f.get_tensor(prefix + key), tensor.half()), prefix + key
    rounded = base.text_encoder.get_input_embeddings().weight
    assert not torch.equal(rounded.half(), rounded.bfloat16().half())  # bf16 copies would have shown

    peaks = [metrics[f"peak_memory_mb_{phase}"] for phase in PHASES]
    assert all(peak > 0 for peak in peaks) and metrics["peak_memory_mb"] == max(peaks)
    assert all(metrics[f"added_memory_mb_{phase}"] >= 0 for phase in PHASES)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"optimizer": "Lion"}, "train.optimizer"),
        ({"keep_tokens": -2}, "train.keep_tokens"),
        ({"mixed_precision": "fp16"}, "train.mixed_precision"),
        ({"base": "/no/such/model"}, "train.base"),
        ({"base": "./no/such/model.safetensors"}, "train.base"),
        ({"vae": "missing-vae-folder/"}, "train.vae"),
        ({"captions": "empty.parquet"}, "train.captions"),
        ({"captions": "no-such.parquet"}, "train.captions"),
        ({"validation": {"split": 5}}, "train.validation.split"),
    ],
)
def test_bad_params_fail_before_any_model_loads(workdir, overrides, name):
    if overrides.get("mixed_precision") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    write_dataset(workdir, [PORTRAIT, SQUARE])
    pd.read_parquet(workdir / "captions.parquet").iloc[:0].to_parquet(workdir / "empty.parquet")
    with pytest.raises(ParamError) as caught:
        run(workdir, **overrides)
    assert caught.value.name == name and "\n" not in str(caught.value)
    assert not (workdir / "models").exists() and not (workdir / "dvclive").exists()


def test_stage_reports_bad_params_in_one_line(workdir):
    write_dataset(workdir, [PORTRAIT])
    write_params(workdir, keep_tokens=-1)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train: error: param train.keep_tokens: must not be negative, got -1"
    assert not (workdir / "metrics").exists()


def test_missing_images_name_the_shards_parameter(workdir):
    write_dataset(workdir, [PORTRAIT, SQUARE])
    frame = pd.read_parquet(workdir / "captions.parquet")
    frame.loc[1, "sha256"] = "0" * 64
    frame.to_parquet(workdir / "captions.parquet")
    with pytest.raises(ParamError) as caught:
        run(workdir)
    assert caught.value.name == "train.shards" and "0" * 64 in str(caught.value)


def test_missing_accelerate_config_is_named(workdir):
    write_dataset(workdir, [PORTRAIT])
    write_params(workdir)
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "POSTERTUNE_ACCELERATE_CONFIG": "nowhere.yaml"}
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "train: error: POSTERTUNE_ACCELERATE_CONFIG=nowhere.yaml: no such accelerate config file"
    )
