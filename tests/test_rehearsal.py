"""The full-size rehearsal (benchmarks/rehearse_fullsize.py): its random SDXL base at the real configs
(checked on the meta device: nothing 10 GB is built), the arithmetic behind its memory prediction,
and the overrides it hands to DVC. The flow itself is the benchmark: its full-size run is
recorded in benchmarks/README.md."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from dvc.utils.hydra import compose_and_dump
from hydra.core.override_parser.overrides_parser import OverridesParser

from benchmarks.random_sdxl import MAX_SHARD_BYTES, build_base, random_weights, sdxl_on_meta, shards
from benchmarks.rehearse_fullsize import (
    RESOLUTION,
    adafactor_state_values,
    demo_values,
    model_shapes,
    overrides,
    predict,
    set_args,
)
from postertune.caption.params import CaptionParams
from postertune.curate.params import CurateParams
from postertune.evaluate.params import EvaluateParams
from postertune.fetch.params import FetchParams
from postertune.lora.params import LoraParams
from postertune.models.loading import load_components
from postertune.models.tiny import tiny_unet_config
from postertune.params import build
from postertune.sample.params import SampleParams
from postertune.train.optim import FusedAdafactor
from postertune.train.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]
SDXL_UNET_PARAMS = 2_567_463_684
SECTIONS = {
    "fetch": FetchParams,
    "caption": CaptionParams,
    "curate": CurateParams,
    "train": TrainParams,
    "lora": LoraParams,
    "sample": SampleParams,
    "evaluate": EvaluateParams,
}


def test_random_base_at_the_real_configs_has_sdxls_parameters_and_fits_in_shards():
    models = sdxl_on_meta("sdxl")
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {
        "unet": SDXL_UNET_PARAMS,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    weights = random_weights(models["unet"], seed=0)
    files = shards(weights, "diffusers", MAX_SHARD_BYTES["sdxl"])
    sizes = [sum(math.prod(weights[n].shape) * 2 for n in shard.names) for shard in files]
    assert len(files) == 3 and max(sizes) <= MAX_SHARD_BYTES["sdxl"] and sum(sizes) == 2 * SDXL_UNET_PARAMS
    assert files[0].file == "diffusion_pytorch_model-00001-of-00003.safetensors"
    assert [n for shard in files for n in shard.names] == list(models["unet"].state_dict())


def test_random_base_loads_like_a_hub_snapshot_and_is_repeatable(tmp_path):
    build_base(tmp_path / "a", "tiny", seed=3)
    build_base(tmp_path / "b", "tiny", seed=3)
    unet_files = sorted(p.name for p in (tmp_path / "a/unet").iterdir())
    assert unet_files == [
        "config.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    for name in unet_files:
        assert (tmp_path / "a/unet" / name).read_bytes() == (tmp_path / "b/unet" / name).read_bytes()

    dtypes = {"unet": torch.float32, "vae": torch.float32, "default": torch.bfloat16}
    components = load_components(str(tmp_path / "a"), dtype=dtypes)
    assert components.unet.dtype == torch.float32 and components.text_encoder_2.dtype == torch.bfloat16
    weight = components.unet.conv_in.weight
    bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
    assert 0 < weight.abs().max() <= bound and weight.std() > bound / 3  # PyTorch's default init, drawn
    assert torch.equal(components.unet.conv_norm_out.weight, torch.ones_like(components.unet.conv_norm_out.weight))


def test_adafactor_state_is_counted_as_transformers_allocates_it():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    optimizer = FusedAdafactor(unet.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    for p in unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    allocated = sum(t.numel() for t in tensors if t.ndim > 0)  # besides one 0-d RMS per tensor
    assert adafactor_state_values([tuple(p.shape) for p in unet.parameters()]) == allocated


def test_overrides_parse_back_to_their_values():
    values = {"profile": "sdxl", **demo_values(), **overrides(Path("/tmp/a base's folder"), 256)}
    args = set_args(values)
    parsed = OverridesParser.create().parse_overrides(args[1::2])
    assert {o.key_or_group: o.value() for o in parsed} == values
    assert values["fetch.sources"][0]["url_prefix"] == "file:data/demo/posters"
    assert values["caption.captioners"] == ["metadata"] and values["evaluate.clip_model"] == "tiny"


@pytest.mark.parametrize("size", ["sdxl", "tiny"])
def test_overrides_compose_into_valid_params_that_keep_the_profiles_recipe(tmp_path, size):
    values = {"profile": "sdxl", **demo_values(), **overrides(tmp_path, RESOLUTION[size])}
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", "", set_args(values)[1::2])
    params = yaml.safe_load(out.read_text())
    for name, cls in SECTIONS.items():
        build(cls, params[name], name)

    train, sdxl = params["train"], yaml.safe_load((ROOT / "conf/profile/sdxl.yaml").read_text())["train"]
    assert (train["base"], train["vae"], train["max_train_steps"]) == (str(tmp_path), None, 2)
    for key in ("optimizer", "optimizer_args", "fused_backward_pass", "gradient_checkpointing", "batch_size"):
        assert train[key] == sdxl[key], key
    assert params["fetch"]["source_dir"] == "data/demo" and params["caption"]["captioners"] == ["metadata"]


def test_prediction_adds_measured_activations_to_counted_weights_and_state(tmp_path):
    build_base(tmp_path, "tiny", seed=0)
    shapes = model_shapes(tmp_path)
    params = sum(math.prod(s) for s in shapes["unet"])
    train = {"trainable_params": params, "added_memory_mb_train": 900.0}
    prediction = predict(train, shapes, batch=2, resolution=128)

    assert prediction["inputs"]["unet_params"] == params
    cases = {(case["name"].split(":")[0], case["batch"]): case for case in prediction["cases"]}
    assert list(cases) == [("sdxl profile", 1), ("sdxl profile", 4), ("full_bf16", 1), ("full_bf16", 4)]
    per_image = prediction["inputs"]["activations_per_image_gib_measured"] * (1024 / 128) ** 2  # pixels
    for (_, batch), case in cases.items():
        terms = case["terms_gib"]
        assert case["total_gib"] == pytest.approx(sum(terms.values()), abs=0.01)
        assert terms["activations"] == pytest.approx(per_image * batch, abs=0.002)
    profile, lean = cases[("sdxl profile", 1)]["terms_gib"], cases[("full_bf16", 1)]["terms_gib"]
    assert profile["weights"] == pytest.approx(2 * lean["weights"], abs=0.002)  # float32 master against bf16
    assert profile["autocast_bf16_copy"] > 0 and lean["autocast_bf16_copy"] == 0
    assert len(prediction["arithmetic"]) == 4 + len(cases)
    with pytest.raises(AssertionError, match="parameters"):
        predict({**train, "trainable_params": params + 1}, shapes, batch=2, resolution=128)
