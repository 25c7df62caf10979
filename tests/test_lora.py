"""LoRA extraction and merging on the tiny SDXL-architecture model (offline, CPU)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from postertune.errors import PipelineError
from postertune.lora.extract import extract, lora_metadata, lora_tensors, save_lora
from postertune.lora.params import LoraParams, MergeItem
from postertune.lora.run import MERGED_FILE, MERGED_UNET, lora_file_name, run
from postertune.models.loading import load_unet, save_unet
from postertune.models.lora import adaptable_layers, kohya_names, merge_loras, read_lora
from postertune.models.tiny import save_tiny_pipeline
from postertune.models.weights import FolderWeights, open_unet_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FULL = 100_000  # above every tiny layer's rank: the whole delta


def perturb(unet: UNet2DConditionModel, seed: int, size: float = 0.02) -> UNet2DConditionModel:
    """A stand-in fine-tune: every Linear and Conv weight moved by dense (full-rank) noise; biases
    and norms, which a LoRA does not carry, stay."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in adaptable_layers(unet):
            weight = modules[name].weight
            weight.add_(torch.randn(weight.shape, generator=gen) * size)
    return unet


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    base = save_tiny_pipeline(root / "base", seed=0)
    save_unet(perturb(load_unet(base / "unet"), seed=1), root / "unet", "float")
    return {"base": base, "unet": root / "unet", "root": root}


@pytest.fixture(scope="module")
def full_rank(models) -> dict:
    """A full-rank kohya LoRA of the fine-tune (3×3 convs included), written to disk."""
    base, tuned = open_unet_weights(models["base"]), FolderWeights(models["unet"])
    extraction = extract(base, tuned, [FULL], FULL, 0.0)
    path = models["root"] / "full.safetensors"
    save_lora(path, lora_tensors(extraction, FULL, "float"), lora_metadata(extraction, FULL, "tiny", "unet"))
    return {"extraction": extraction, "path": path}


def unet_inputs(unet: UNet2DConditionModel, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=gen),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim, generator=gen),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=gen),
            "time_ids": torch.tensor([[96.0, 64.0, 0.0, 0.0, 96.0, 64.0]] * 2),
        },
    )


@torch.no_grad()
def output(unet: UNet2DConditionModel) -> torch.Tensor:
    return unet(**unet_inputs(unet)).sample


def test_full_rank_lora_reproduces_every_delta(models, full_rank):
    base, tuned = load_unet(models["base"] / "unet"), load_unet(models["unet"])
    lora = read_lora(full_rank["path"], adaptable_layers(base), base.config)
    assert set(lora.layers) == set(adaptable_layers(base))  # every Linear and Conv, none skipped
    tuned_weights = dict(tuned.named_parameters())
    base_weights = dict(base.named_parameters())
    worst = 0.0
    for name, layer in lora.layers.items():
        delta = (tuned_weights[f"{name}.weight"] - base_weights[f"{name}.weight"]).detach()
        got = layer.delta(tuple(delta.shape))
        worst = max(worst, float((got - delta).abs().max() / delta.abs().max()))
    assert worst < 1e-4
    assert full_rank["extraction"].relative_error(FULL) == 0.0


def test_base_plus_full_rank_lora_computes_what_the_fine_tune_computes(models, full_rank):
    base, tuned = load_unet(models["base"] / "unet"), load_unet(models["unet"])
    lora = read_lora(full_rank["path"], adaptable_layers(base), base.config)
    assert not torch.allclose(output(base), output(tuned), atol=1e-3)
    merge_loras(base, [(lora, 1.0)])
    expected, got = output(tuned), output(base)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), float((got - expected).abs().max())


def test_kohya_file_has_the_sdxl_layout_and_metadata(models, full_rank):
    with safe_open(full_rank["path"], framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys  # a 3×3 conv
    assert "lora_unet_output_blocks_2_2_conv.alpha" in keys  # the upsampler after a cross-attn level
    assert "lora_unet_middle_block_1_proj_in.lora_down.weight" in keys
    assert all(k.startswith("lora_unet_") and k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["postertune.base_model"] == "tiny"
    assert json.loads(meta["postertune.ranks"]) == {"linear": FULL, "conv1x1": FULL, "conv3x3": FULL}


def test_error_per_rank_falls_as_the_rank_grows(models):
    base, tuned = open_unet_weights(models["base"]), FolderWeights(models["unet"])
    ranks = [1, 2, 4, 8, 16, 32, 64]
    extraction = extract(base, tuned, ranks, 4, 0.0)
    errors = [extraction.relative_error(r) for r in ranks]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert 0 < errors[-1] < errors[0] <= 1
    # the error reported is the error of the written file
    lora_layers = lora_tensors(extraction, 4, "float")
    names = kohya_names(extraction.layers, extraction.config)
    left = total = 0.0
    b, t = load_unet(models["base"] / "unet"), load_unet(models["unet"])
    bw, tw = dict(b.named_parameters()), dict(t.named_parameters())
    for name, shape in extraction.shapes.items():
        delta = (tw[f"{name}.weight"] - bw[f"{name}.weight"]).detach()
        total += float(delta.pow(2).sum())
        if name in names:
            down, up = lora_layers[f"{names[name]}.lora_down.weight"], lora_layers[f"{names[name]}.lora_up.weight"]
            approx = (up.flatten(1) @ down.flatten(1)).reshape(shape)
            left += float((delta - approx).pow(2).sum())
        else:
            left += float(delta.pow(2).sum())
    assert (left / total) ** 0.5 == pytest.approx(extraction.relative_error(4), rel=1e-3)


def test_threshold_and_conv_rank_zero_leave_layers_out(models):
    base, tuned = open_unet_weights(models["base"]), FolderWeights(models["unet"])
    extraction = extract(base, tuned, [4], 0, 0.0)
    assert extraction.layers and all(layer.kind != "conv3x3" for layer in extraction.layers.values())
    extraction = extract(open_unet_weights(models["base"]), FolderWeights(models["unet"]), [4], 4, 1e9)
    assert extraction.layers == {} and extraction.relative_error(4) == 1.0


# -- diffusers' own loader -------------------------------------------------------------------

needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="diffusers' LoRA loading needs peft (in the test extra)"
)


@needs_peft
def test_diffusers_load_lora_weights_takes_every_key_and_matches_the_projects_merge(models, full_rank, caplog):
    pipe = StableDiffusionXLPipeline.from_pretrained(models["base"], use_safetensors=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(full_rank["path"]), adapter_name="extracted")
    complaints = [
        r.getMessage() for r in caplog.records if not r.getMessage().startswith("No LoRA keys associated to CLIPText")
    ]
    assert complaints == []  # (the text encoders' "no LoRA keys" notes are expected: a U-Net LoRA)
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    adapted = {name for name, m in pipe.unet.named_modules() if isinstance(m, PeftLoraLayer)}
    lora = read_lora(full_rank["path"], adaptable_layers(load_unet(models["base"] / "unet")), pipe.unet.config)
    assert adapted == set(lora.layers)  # nothing missing, nothing extra

    ours = load_unet(models["base"] / "unet")
    merge_loras(ours, [(lora, 1.0)])
    expected, got = output(ours), output(pipe.unet)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), float((got - expected).abs().max())


def diffusers_lora(models, folder: Path, rank: int = 4, alpha: int = 8) -> Path:
    """A diffusers-format LoRA file as diffusers itself saves one (PEFT keys, adapter metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = load_unet(models["base"] / "unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "time_emb_proj"]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        rank_pattern={"conv1": 2},
        alpha_pattern={"proj_in": 3},
    )
    unet.add_adapter(config)
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(),
        weight_name="diffusers_lora.safetensors",
    )
    return folder / "diffusers_lora.safetensors"


@needs_peft
def test_merging_a_diffusers_lora_equals_diffusers_fuse_lora(models, tmp_path):
    path = diffusers_lora(models, tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(models["unet"].parent / "base", use_safetensors=True)
    pipe.load_lora_weights(str(path), adapter_name="d")
    pipe.fuse_lora(components=["unet"], lora_scale=0.7)
    pipe.unload_lora_weights()

    ours = load_unet(models["base"] / "unet")
    lora = read_lora(path, adaptable_layers(ours), ours.config)
    assert lora.layout == "peft"
    merge_loras(ours, [(lora, 0.7)])
    theirs = pipe.unet.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs[key], rtol=1e-5, atol=1e-6), key


# -- the stage ---------------------------------------------------------------------------------


def test_stage_extracts_each_rank_and_merges_into_both_formats(models, full_rank, tmp_path):
    params = LoraParams(
        base=models["base"],
        unet=models["unet"],
        extract_ranks=[2, 8],
        conv_rank=4,
        device="cpu",
        merge=[MergeItem(full_rank["path"], -1.0)],  # minus the fine-tune's own delta: the base again
        merge_into="finetuned",
        output=tmp_path / "lora",
    )
    metrics = run(params)
    assert metrics["ranks"]["2"]["relative_error"] > metrics["ranks"]["8"]["relative_error"] > 0
    assert metrics["ranks"]["8"]["file_bytes"] == (tmp_path / "lora" / lora_file_name(8)).stat().st_size
    assert metrics["merged_layers"] == len(
        read_lora(full_rank["path"], full_rank["extraction"].shapes, full_rank["extraction"].config).layers
    )
    merged = load_unet(tmp_path / "lora" / MERGED_UNET)
    base = load_unet(models["base"] / "unet")
    merged_state, base_state = merged.state_dict(), base.state_dict()
    lora_layers = set(full_rank["extraction"].layers)
    for key, value in merged_state.items():
        if key.removesuffix(".weight") in lora_layers:
            assert torch.allclose(value, base_state[key], atol=1e-5), key
    pipe = StableDiffusionXLPipeline.from_single_file(
        tmp_path / "lora" / MERGED_FILE, config=str(models["base"]), use_safetensors=True
    )
    single = pipe.unet.state_dict()
    assert all(torch.equal(single[k], v) for k, v in merged_state.items())


def test_disabled_stage_writes_an_empty_folder(models, tmp_path):
    out = tmp_path / "lora"
    assert run(LoraParams(enabled=False, base=models["base"], unet=models["unet"], output=out)) == {"enabled": 0}
    assert out.is_dir() and not any(out.iterdir())


# -- bad files ----------------------------------------------------------------------------------


def _bad_files(models, full_rank, folder: Path) -> dict[str, tuple[Path, str]]:
    good = load_file(full_rank["path"])
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    files = {
        "unknown": ({**good, "lora_unet_input_blocks_4_1_teleporter.lora_down.weight": torch.zeros(1, 2)}, {}),
        "sd15": (
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1),
            },
            {},
        ),
        "sd15_meta": (good, {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}),
        "te_only": (
            {
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4),
            },
            {},
        ),
        "shape": ({**good, f"{q}.lora_up.weight": torch.zeros(7, good[f"{q}.lora_up.weight"].shape[1])}, {}),
        "half": ({k: v for k, v in good.items() if k != f"{q}.lora_up.weight"}, {}),
    }
    paths = {}
    for name, (tensors, meta) in files.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(tensors, paths[name], metadata=meta or None)
    (folder / "text.safetensors").write_text("not a tensor file")
    paths["text"] = folder / "text.safetensors"
    expected = {
        "unknown": "key lora_unet_input_blocks_4_1_teleporter.lora_down.weight: unknown key",
        "sd15": "key lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight: a LoRA for another architecture",
        "sd15_meta": "made for another architecture (stable-diffusion-v1/lora",
        "te_only": "a text-encoder-only LoRA (first key lora_te1_text_model_encoder_layers_0_self_attn_q_proj.",
        "shape": f"key {q}: shapes down",
        "half": f"key {q}: has no up weight",
        "text": "not a safetensors file",
    }
    return {name: (paths[name], expected[name]) for name in paths}


def test_bad_lora_files_give_one_line_errors_naming_file_and_key(models, full_rank, tmp_path):
    layers = full_rank["extraction"].shapes
    config = full_rank["extraction"].config
    for name, (path, expected) in _bad_files(models, full_rank, tmp_path).items():
        with pytest.raises(PipelineError) as info:
            read_lora(path, layers, config)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"LoRA {path}: "), name
        assert expected in message, (name, message)


def test_a_bad_merge_file_stops_the_stage_before_anything_is_written(models, full_rank, tmp_path):
    bad = _bad_files(models, full_rank, tmp_path)["shape"][0]
    out = tmp_path / "lora"
    params = LoraParams(
        base=models["base"],
        unet=models["unet"],
        merge=[MergeItem(full_rank["path"]), MergeItem(bad, 0.5)],
        device="cpu",
        output=out,
    )
    (tmp_path / "params.yaml").write_text(
        json.dumps(
            {
                "lora": {
                    "base": str(models["base"]),
                    "unet": str(models["unet"]),
                    "output": str(out),
                    "device": "cpu",
                    "merge": [{"path": str(full_rank["path"])}, {"path": str(bad), "weight": 0.5}],
                }
            }
        )
    )
    stage = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stage), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "stages.lora"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lora: error: LoRA {bad}: key "), done.stderr
    assert not out.exists() and params.merge[1].weight == 0.5


# -- the sample stage renders LoRAs ----------------------------------------------------------------


def test_sample_stage_renders_base_plus_lora_and_finetuned_plus_lora_at_a_weight(models, full_rank, tmp_path):
    import numpy as np
    from PIL import Image

    from postertune.params import build
    from postertune.sample.params import SampleParams
    from postertune.sample.run import sample

    stage = Path(__file__).resolve().parents[1]
    lora = {"path": str(full_rank["path"])}
    params = build(
        SampleParams,
        dict(
            models=[
                dict(name="finetuned", base=str(models["base"]), unet=str(models["unet"])),
                dict(name="base", base=str(models["base"])),
                dict(name="base-lora", base=str(models["base"]), loras=[lora]),  # base+lora:<file>
                dict(  # finetuned+lora:<file>@-1: the fine-tune with its own delta taken out again
                    name="finetuned-lora",
                    base=str(models["base"]),
                    unet=str(models["unet"]),
                    loras=[{**lora, "weight": -1.0}],
                ),
            ],
            prompts=str(stage / "data/prompts/posters.csv"),
            negative_presets=str(stage / "data/prompts/negative_presets.yaml"),
            lora_dir=str(models["root"]),
            prompt_ids=["pet_bag"],
            images_per_prompt=1,
            steps=2,
            width=64,
            height=64,
            grid_cell_width=64,
            device="cpu",
            output=str(tmp_path / "samples"),
        ),
        "sample",
    )
    report = sample(params)
    assert report.images == 4 and len(report.grids) == 1

    def pixels(model: str) -> np.ndarray:
        path = tmp_path / "samples" / "images" / model / "pet_bag" / "seed-0.png"
        return np.asarray(Image.open(path), dtype=np.int16)

    assert np.abs(pixels("base-lora") - pixels("finetuned")).max() <= 2
    assert np.abs(pixels("finetuned-lora") - pixels("base")).max() <= 2
    assert np.abs(pixels("base") - pixels("finetuned")).max() > 10
    # the LoRA's file and weight are part of what an image is keyed on
    from postertune.sample.models import fingerprints
    from postertune.sample.params import LoraWeight, SampledModel

    def model(weight: float) -> SampledModel:
        return SampledModel(
            name=f"w{weight:g}", base=str(models["base"]), loras=[LoraWeight(full_rank["path"], weight)]
        )

    hashes = fingerprints([model(1.0), model(0.5)])
    assert hashes["w1"] != hashes["w0.5"]
