"""Optimizer recipe knobs of the train stage: Prodigy, per-block U-Net learning rates (kohya-ss
``block_lr``) and text-encoder training, each checked by what it does to the tiny model's weights."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from postertune.models.ldm_keys import SDXL_UNET_BLOCKS, unet_blocks
from postertune.models.sdxl_configs import SDXL_UNET
from postertune.models.tiny import tiny_unet_config
from postertune.params import ParamError, build
from postertune.sample.models import fingerprints, load_model
from postertune.sample.params import SampledModel
from postertune.train.groups import param_groups
from postertune.train.optim import check_optimizer_args
from postertune.train.params import TrainParams, load_train_params
from postertune.train.run import run as train
from tests.train_inputs import fresh_process_state, train_section, write_dataset, write_params

PORTRAIT, SQUARE = (200, 300), (300, 300)
LEARNING_RATE = 1e-3
ADAFACTOR = dict(
    optimizer="Adafactor",
    optimizer_args={"relative_step": False, "scale_parameter": False, "warmup_init": False},
    max_grad_norm=0.0,
)


def params(**overrides) -> TrainParams:
    return build(TrainParams, train_section(**overrides), "train")


def multipliers(**blocks: float) -> list[float]:
    """1 for every block of the tiny U-Net but those named (``input_blocks_4=0.5``)."""
    names = unet_blocks(tiny_unet_config())
    values = {name.replace(".", "_"): 1.0 for name in names} | blocks
    return [values[name.replace(".", "_")] for name in names]


pytestmark = pytest.mark.usefixtures(fresh_process_state.__name__)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path, [PORTRAIT, SQUARE])
    return tmp_path


def run(folder: Path, **overrides) -> dict:
    write_params(folder, **overrides)
    return train(load_train_params(folder / "params.yaml"))


def logged(folder: Path, name: str) -> list[float]:
    table = pd.read_csv(folder / "dvclive/train/plots/metrics/train" / f"{name}.tsv", sep="\t")
    return table[name].tolist()


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in before if not torch.equal(before[key], after[key])}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in module.state_dict().items()}


def assert_equal_weights(expected: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    actual = module.state_dict()
    assert set(actual) == set(expected)
    assert [key for key in expected if not torch.equal(actual[key], expected[key])] == []


# --- checked on load ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"block_lr": [1.0] * 5}, "train.block_lr"),  # the tiny U-Net has 23 blocks
        ({"block_lr": [0.0] * SDXL_UNET_BLOCKS}, "train.block_lr"),
        ({"block_lr": multipliers(out=-1.0)}, f"train.block_lr[{SDXL_UNET_BLOCKS - 1}]"),
        (
            {"block_lr": multipliers(), "optimizer": "Adafactor", "learning_rate": None, "lr_scheduler": "adafactor"},
            "train.block_lr",
        ),
        ({"block_lr": multipliers(out=0.5), "optimizer": "Prodigy", "learning_rate": 1.0}, "train.block_lr"),
        ({"learning_rate_te1": 1e-5}, "train.learning_rate_te1"),  # without train_text_encoder
        ({"train_text_encoder": True, "learning_rate_te1": 0, "learning_rate_te2": 0}, "train.train_text_encoder"),
        (
            {"train_text_encoder": True, "optimizer": "Prodigy", "learning_rate": 1.0, "learning_rate_te2": 0.5},
            "train.learning_rate_te2",
        ),
        ({"train_text_encoder": True, "cache_text_encoder_outputs": True}, "train.cache_text_encoder_outputs"),
        ({"shuffle_caption": True, "cache_text_encoder_outputs": True}, "train.cache_text_encoder_outputs"),
        (
            {"optimizer": "Prodigy", "learning_rate": 1.0, "optimizer_args": {"d_coeff": 2}},
            "train.optimizer_args.d_coeff",
        ),
    ],
)
def test_bad_knobs_name_the_parameter_in_one_line(overrides, name):
    with pytest.raises(ParamError) as caught:
        check_optimizer_args(params(**overrides))
    assert caught.value.name == name
    assert "\n" not in str(caught.value)


def test_prodigy_with_a_learning_rate_far_from_one_warns(caplog):
    args = {
        "d_coef": 2.0,
        "safeguard_warmup": True,
        "use_bias_correction": True,
        "weight_decay": 0.01,
        "decouple": True,
    }
    with caplog.at_level(logging.WARNING):
        check_optimizer_args(params(optimizer="Prodigy", learning_rate=1.0, optimizer_args=args))
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        params(optimizer="Prodigy", learning_rate=1e-4)
    (record,) = caplog.records
    assert "train.learning_rate" in record.getMessage() and "Prodigy" in record.getMessage()


def test_block_lr_numbers_the_blocks_as_kohya_does_and_derives_their_count_from_the_unet():
    assert len(unet_blocks(SDXL_UNET)) == len(unet_blocks(tiny_unet_config())) == SDXL_UNET_BLOCKS
    two_levels = dict(
        tiny_unet_config(),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
    )
    # embeddings, conv_in + 2 levels x 2 resnets + 1 downsampler, 3 middle, 2 levels x 3, out
    assert len(unet_blocks(two_levels)) == 1 + 6 + 3 + 6 + 1

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    rates = multipliers(embeddings=0.0, input_blocks_3=0.25, middle_block_1=0.5, output_blocks_2=2.0)
    groups = param_groups(params(block_lr=rates), unet, {})
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == [f"unet.{b}" for b in unet_blocks(unet.config) if b != "embeddings"]
    assert by_name["unet.input_blocks.3"]["lr"] == pytest.approx(0.25 * LEARNING_RATE)
    assert by_name["unet.middle_block.1"]["lr"] == pytest.approx(0.5 * LEARNING_RATE)
    assert by_name["unet.out"]["lr"] == pytest.approx(LEARNING_RATE)

    names = {id(p): n for n, p in unet.named_parameters()}
    block_of = {names[id(p)]: g["name"] for g in groups for p in g["params"]}
    expected = {  # diffusers module → kohya block (the README's table)
        "conv_in.weight": "unet.input_blocks.0",
        "down_blocks.0.resnets.1.conv1.weight": "unet.input_blocks.2",
        "down_blocks.0.downsamplers.0.conv.weight": "unet.input_blocks.3",
        "down_blocks.1.attentions.1.proj_in.weight": "unet.input_blocks.5",
        "down_blocks.2.resnets.0.conv1.weight": "unet.input_blocks.7",
        "mid_block.resnets.0.conv1.weight": "unet.middle_block.0",
        "mid_block.attentions.0.proj_out.weight": "unet.middle_block.1",
        "mid_block.resnets.1.conv1.weight": "unet.middle_block.2",
        "up_blocks.0.upsamplers.0.conv.weight": "unet.output_blocks.2",
        "up_blocks.1.attentions.0.proj_in.weight": "unet.output_blocks.3",
        "up_blocks.2.resnets.2.conv1.weight": "unet.output_blocks.8",
        "conv_out.weight": "unet.out",
    }
    assert {k: block_of[k] for k in expected} == expected
    # multiplier 0: frozen, in no group; every other weight in exactly one
    embeddings = [n for n in names.values() if n.startswith(("time_embedding.", "add_embedding."))]
    assert embeddings and not any(n in block_of for n in embeddings)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if n in embeddings)
    assert len(block_of) == sum(len(g["params"]) for g in groups) == len(names) - len(embeddings)

    # a U-Net of another layout: the count comes from its config, at run start
    other = UNet2DConditionModel(**two_levels)
    with pytest.raises(ParamError) as caught:
        param_groups(params(base="owner/model", block_lr=rates), other, {})
    assert caught.value.name == "train.block_lr" and "needs 17 multipliers" in str(caught.value)


# --- training -------------------------------------------------------------------------------


def test_prodigy_takes_its_own_step_size_and_trains_the_unet(workdir):
    args = {"d0": 1e-5, "d_coef": 2.0, "safeguard_warmup": True, "use_bias_correction": True, "weight_decay": 0.0}
    run(workdir, max_train_steps=2, optimizer="Prodigy", learning_rate=1.0, optimizer_args=args,
        checkpoints={"every_n_steps": 1})  # fmt: skip
    base = load_file(workdir / "models/base/unet/diffusion_pytorch_model.safetensors")
    (first,) = (workdir / "models/checkpoints").glob("*/step-0000001")
    stepped = load_file(first / "model.safetensors")
    tuned = load_file(workdir / "models/unet/diffusion_pytorch_model.safetensors")
    assert len(changed(base, tuned)) > 0.9 * len(base)
    # the first step moves each weight by Prodigy's initial estimate d0 x learning_rate (AdamW: by 1.0)
    moved = torch.cat([(stepped[k] - base[k]).abs().flatten() for k in base])
    assert moved.median().item() == pytest.approx(1e-5, rel=0.05)
    group = torch.load(first / "optimizer.bin", weights_only=False)["param_groups"][0]
    assert (group["d0"], group["d_coef"], group["safeguard_warmup"], group["use_bias_correction"]) == (
        1e-5,
        2.0,
        True,
        True,
    )


def test_block_lr_freezes_zero_blocks_and_scales_each_blocks_update(workdir):
    rates = multipliers(embeddings=0.0, input_blocks_4=0.25, output_blocks_5=0.5)
    run(
        workdir,
        max_train_steps=2,
        block_lr=rates,
        optimizer_args={"weight_decay": 0.0},
        checkpoints={"every_n_steps": 1},
    )
    base = load_file(workdir / "models/base/unet/diffusion_pytorch_model.safetensors")
    first = load_file(next((workdir / "models/checkpoints").glob("*/step-0000001")) / "model.safetensors")
    final = load_file(workdir / "models/unet/diffusion_pytorch_model.safetensors")

    frozen = {k for k in base if k.startswith(("time_embedding.", "add_embedding."))}
    assert frozen and changed(base, final) == set(base) - frozen

    # Adam's first step moves each weight by lr x multiplier (gradient / |gradient|)
    def step_size(prefix: str) -> float:
        moved = torch.cat([(first[k] - base[k]).abs().flatten() for k in base if k.startswith(prefix)])
        return moved.median().item() / LEARNING_RATE

    assert step_size("down_blocks.1.resnets.0.") == pytest.approx(0.25, rel=0.02)  # input_blocks.4
    assert step_size("up_blocks.1.resnets.2.") == pytest.approx(0.5, rel=0.02)  # output_blocks.5
    assert step_size("up_blocks.1.resnets.1.") == pytest.approx(1.0, rel=0.02)  # output_blocks.4
    assert logged(workdir, "lr") == [LEARNING_RATE] * 2  # the schedule's rate, before multipliers


def test_fused_adafactor_steps_block_groups_and_text_encoders_exactly_as_unfused(tmp_path, monkeypatch):
    recipe = dict(ADAFACTOR, max_train_steps=2, block_lr=multipliers(out=0.0, middle_block_1=0.5))
    recipe.update(train_text_encoder=True, learning_rate_te1=2e-4, learning_rate_te2=0)
    final = {}
    for fused in (False, True):
        folder = tmp_path / str(fused)
        folder.mkdir()
        write_dataset(folder, [PORTRAIT, SQUARE])
        monkeypatch.chdir(folder)
        run(folder, **recipe, fused_backward_pass=fused)
        final[fused] = {
            "unet": load_file(folder / "models/unet/diffusion_pytorch_model.safetensors"),
            "text_encoder": load_file(folder / "models/text_encoders/text_encoder/model.safetensors"),
        }
        assert sorted(p.name for p in (folder / "models/text_encoders").iterdir()) == ["text_encoder"]
    for part in ("unet", "text_encoder"):
        assert changed(final[False][part], final[True][part]) == set()
    base = load_file(tmp_path / "True/models/base/unet/diffusion_pytorch_model.safetensors")
    assert changed(base, final[True]["unet"]) == {k for k in base if not k.startswith(("conv_norm_out", "conv_out"))}


def test_trained_text_encoders_round_trip_both_formats_and_render_the_samples(workdir):
    metrics = run(
        workdir,
        max_train_steps=2,
        train_text_encoder=True,
        learning_rate_te1=2e-4,
        validation={"split": 1, "every_n_steps": 1},
        checkpoints={"every_n_steps": 2},
    )
    assert not (workdir / "models/cache/text").exists()  # encodings change at every step: never cached
    (checkpoint,) = (workdir / "models/checkpoints").glob("*/step-0000002")
    trained = {  # the live encoders, as the checkpoint holds them
        "text_encoder": load_file(checkpoint / "model_1.safetensors"),
        "text_encoder_2": load_file(checkpoint / "model_2.safetensors"),
    }
    base = StableDiffusionXLPipeline.from_pretrained(workdir / "models/base")
    before = {name: weights(getattr(base, name)) for name in trained}
    # encoder 1's last layer and final norm feed nothing SDXL reads: kept frozen; all else moved
    tail = {k for k in before["text_encoder"] if k.startswith(("encoder.layers.2.", "final_layer_norm."))}
    assert changed(before["text_encoder"], trained["text_encoder"]) == set(before["text_encoder"]) - tail
    assert changed(before["text_encoder_2"], trained["text_encoder_2"]) == set(before["text_encoder_2"])
    assert metrics["trainable_params"] == sum(
        t.numel() for part in (base.unet.state_dict(), trained["text_encoder"], trained["text_encoder_2"])
        for k, t in part.items() if k not in tail
    )  # fmt: skip
    assert logged(workdir, "lr_text_encoder") == [2e-4] * 2
    assert logged(workdir, "lr_text_encoder_2") == [LEARNING_RATE] * 2

    # the diffusers folders
    folders = workdir / "models/text_encoders"
    assert_equal_weights(trained["text_encoder"], CLIPTextModel.from_pretrained(folders / "text_encoder"))
    assert_equal_weights(
        trained["text_encoder_2"], CLIPTextModelWithProjection.from_pretrained(folders / "text_encoder_2")
    )
    # the single file, read back by diffusers with the tiny configs
    single = StableDiffusionXLPipeline.from_single_file(
        str(workdir / "models/sdxl-poster.safetensors"), config=str(workdir / "models/base")
    )
    for name, expected in trained.items():
        assert_equal_weights(expected, getattr(single, name))

    # the sample stage renders the fine-tune with its trained encoders
    finetuned = SampledModel(
        "finetuned", "models/base", Path("models/unet"), text_encoders=Path("models/text_encoders")
    )
    pipe = load_model(finetuned, "float", "cpu")
    for name, expected in trained.items():
        assert_equal_weights(expected, getattr(pipe, name))
    unet_only = SampledModel("finetuned", "models/base", Path("models/unet"))
    assert_equal_weights(before["text_encoder"], load_model(unet_only, "float", "cpu").text_encoder)
    assert fingerprints([finetuned]) != fingerprints([unet_only])
