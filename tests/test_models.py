"""SDXL loading and saving: diffusers folders, the single-file original layout, VAE overrides.

Everything runs on the tiny SDXL-architecture model, offline: sockets to anything but the
loopback interface fail, and the hub is in offline mode. The real SDXL layout is checked
on meta-device models built from the real configs (shapes and names, no weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from postertune.errors import PipelineError
from postertune.models.loading import (
    POINTER_FILE,
    SDXLComponents,
    dtype_of,
    load_components,
    load_pipeline,
    pipeline_from_source,
    save_base_folder,
    save_unet,
)
from postertune.models.precision import torch_dtype
from postertune.models.sdxl_configs import CLIP_VIT_L, OPEN_CLIP_BIG_G, SDXL_UNET, SDXL_VAE
from postertune.models.single_file import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_l_to_original,
    open_clip_to_original,
    original_state_dict,
    save_single_file,
    save_vae_single_file,
    unet_to_original,
    vae_to_original,
)
from postertune.models.sources import ModelSource, source_kind, validate_model_source
from postertune.models.tiny import build_tiny_pipeline, save_tiny_pipeline
from postertune.params import ParamError

PRECISIONS = ["float", "fp16", "bf16"]
COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any connection that leaves the machine, and keep the hub offline."""
    import huggingface_hub.constants

    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def base_dir(store) -> Path:
    """The tiny model (seed 0) as a diffusers folder."""
    return save_tiny_pipeline(store / "base", seed=0)


@pytest.fixture(scope="module")
def tiny(store) -> StableDiffusionXLPipeline:
    """The reference: the tiny model of seed 0, built directly."""
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def single_file(store, tiny) -> Path:
    return save_single_file(
        store / "sdxl.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2, "float"
    )


@pytest.fixture(scope="module")
def other_dir(store) -> Path:
    """The tiny model of seed 1 as a diffusers folder: weights unlike the base's."""
    return save_tiny_pipeline(store / "other", seed=1)


@pytest.fixture(scope="module")
def other_vae(other_dir) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(other_dir / "vae")


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, dtype: torch.dtype = torch.float32):
    """Every tensor of ``expected``, cast to ``dtype``, equals ``actual``'s (compared exactly)."""
    want, got = expected.state_dict(), actual.state_dict()
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(want[k].to(dtype).float(), got[k].float())]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_one_line_error(exc_info, *fragments: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- validate_model_source -------------------------------------------------------------


def test_validate_model_source_accepts_every_kind(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    kinds = {
        "tiny": "tiny",
        str(tmp_path): "folder",
        str(tmp_path / "model.safetensors"): "file",
        "stabilityai/stable-diffusion-xl-base-1.0": "hub",
        "madebyollin/sdxl-vae-fp16-fix": "hub",
    }
    for value, kind in kinds.items():
        assert validate_model_source("train.base", value) is None, value  # accepted: no ParamError
        assert source_kind("train.base", value) == kind, value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/no/such/folder", "no such file or folder"),
        ("./weights/missing.safetensors", "no such file or folder"),
        ("owner/name/extra", "no such file or folder"),
        ("sdxl base", "not 'tiny' or a hub id"),
        ("-owner/name", "not 'tiny' or a hub id"),
        ("", "expected 'tiny'"),
    ],
)
def test_validate_model_source_rejects(value, problem):
    with pytest.raises(ParamError) as exc_info:
        validate_model_source("train.vae", value)
    assert_one_line_error(exc_info, "train.vae", problem)


def test_validate_model_source_refuses_pickled_checkpoints(tmp_path):
    ckpt = tmp_path / "sd_xl_base_1.0.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(ParamError) as exc_info:
        validate_model_source("train.base", str(ckpt))
    assert_one_line_error(exc_info, "train.base", str(ckpt), ".safetensors")


# --- the original key layout, on the real SDXL architecture ------------------------------


@pytest.fixture(scope="module")
def sdxl_on_meta():
    """The real SDXL components' structure, without weights."""
    with torch.device("meta"):
        return dict(
            unet=UNet2DConditionModel(**SDXL_UNET),
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L, hidden_act="quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIG_G, hidden_act="gelu")),
        )


def test_real_sdxl_names_and_shapes(sdxl_on_meta):
    state = original_state_dict(**sdxl_on_meta)
    # Names and shapes as they appear in sd_xl_base_1.0.safetensors.
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
    }
    assert {k: tuple(state[k].shape) for k in expected if k in state} == expected
    assert not any(k.startswith(f"{UNET_PREFIX}input_blocks.9") or ".output_blocks.9" in k for k in state)
    assert infer_diffusers_model_type(state) == "xl_base"


def test_real_sdxl_layout_inverts_diffusers_converters(sdxl_on_meta):
    """diffusers' own original→diffusers converters map every tensor back to its place."""
    unet, vae = sdxl_on_meta["unet"], sdxl_on_meta["vae"]
    text_encoder, text_encoder_2 = sdxl_on_meta["text_encoder"], sdxl_on_meta["text_encoder_2"]

    # The U-Net converter only moves values, so each can carry the name it started from.
    names = list(unet.state_dict())
    tagged = {UNET_PREFIX + original: name for original, name in zip(unet_to_original(unet), names, strict=True)}
    assert convert_ldm_unet_checkpoint(tagged, dict(unet.config)) == {name: name for name in names}

    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_to_original(vae).items()}, vae.config)
    state = vae.state_dict()
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)

    back = convert_ldm_clip_checkpoint({CLIP_L_PREFIX + k: v for k, v in clip_l_to_original(text_encoder).items()})
    assert {k.removeprefix("text_model.") for k in back} == set(text_encoder.state_dict())

    original = {OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_original(text_encoder_2).items()}
    back = convert_open_clip_checkpoint(text_encoder_2, original, prefix=OPEN_CLIP_PREFIX)
    state = text_encoder_2.state_dict()
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)


# --- save_unet ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_save_unet_round_trip(tmp_path, tiny, precision):
    folder = save_unet(tiny.unet, tmp_path / "unet", precision)

    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {
            {"float": "F32", "fp16": "F16", "bf16": "BF16"}[precision]
        }
    loaded = UNet2DConditionModel.from_pretrained(folder)
    assert_same_weights(tiny.unet, loaded, torch_dtype(precision))
    assert tiny.unet.dtype == torch.float32  # the model itself is not cast


def test_save_unet_replaces_folder_whole(tmp_path, tiny):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"old")
    save_unet(tiny.unet, folder, "fp16")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]


# --- save_single_file ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_single_file_round_trips_through_diffusers(tmp_path, tiny, base_dir, precision):
    path = save_single_file(
        tmp_path / "sdxl.safetensors", tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2, precision
    )
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
    assert all(k.startswith(prefixes) for k in keys)
    fused = 4 * tiny.text_encoder_2.config.num_hidden_layers  # q, k, v weights and biases → in_proj_*
    assert len(keys) == sum(len(getattr(tiny, c).state_dict()) for c in COMPONENTS) - fused

    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(base_dir))
    for component in COMPONENTS:
        assert_same_weights(getattr(tiny, component), getattr(loaded, component), torch_dtype(precision))

    if precision == "float":
        unet = UNet2DConditionModel.from_single_file(str(path), config=str(base_dir), subfolder="unet")
        assert_same_weights(tiny.unet, unet)


PROJECT = Path(__file__).resolve().parents[1]
SAVE_IN_A_FRESH_PROCESS = """
import sys
from postertune.models.single_file import save_single_file
from postertune.models.tiny import build_tiny_pipeline
pipe = build_tiny_pipeline(seed=0)
save_single_file(sys.argv[1], pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, "fp16")
"""


def test_single_file_bytes_are_the_same_in_every_process(tmp_path):
    """Two identical runs write identical bytes (its header metadata in sorted order), so DVC
    sees no change; processes differ in their string hashing, which once reordered it."""
    pipe = build_tiny_pipeline(seed=0)  # here, under this process's random string hashing
    here = save_single_file(
        tmp_path / "here.safetensors", pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, "fp16"
    )
    out = tmp_path / "fresh.safetensors"  # and in a process whose string hashing is not randomised
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(PROJECT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS, str(out)], env=env, check=True, capture_output=True)
    written = [here.read_bytes(), out.read_bytes()]
    assert written[0] == written[1]
    size = int.from_bytes(written[0][:8], "little")
    metadata = json.loads(written[0][8 : 8 + size])["__metadata__"]
    assert list(metadata) == sorted(metadata) and "modelspec.architecture" in metadata


# --- load_components ----------------------------------------------------------------------


def test_load_tiny_components(tiny):
    components = load_components("tiny", seed=0)

    assert isinstance(components, SDXLComponents)
    assert components.source == ModelSource(base="tiny", seed=0)
    for component in COMPONENTS:
        assert_same_weights(getattr(tiny, component), getattr(components, component))
    assert isinstance(components.noise_scheduler, DDPMScheduler)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert components.noise_scheduler.config[key] == tiny.scheduler.config[key]
    assert components.tokenizer("a poster").input_ids[0] == 49406
    assert components.tokenizer_2.pad_token == "!"

    image = components.pipeline()("a poster", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_load_components_from_diffusers_folder(base_dir, tiny):
    components = load_components(str(base_dir))
    for component in COMPONENTS:
        assert_same_weights(getattr(tiny, component), getattr(components, component))
    assert type(components.scheduler) is type(tiny.scheduler)


def test_load_components_from_single_file(single_file, base_dir, tiny):
    components = load_components(str(single_file), single_file_config=str(base_dir))
    for component in COMPONENTS:
        assert_same_weights(getattr(tiny, component), getattr(components, component))


def test_load_components_from_hub_id_in_cache(tmp_path, base_dir, tiny):
    """A hub id goes through the normal from_pretrained path; offline it resolves from the cache."""
    repo = tmp_path / "hub" / "models--postertune--tiny-sdxl"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(base_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    components = load_components("postertune/tiny-sdxl", cache_dir=tmp_path / "hub")
    assert_same_weights(tiny.unet, components.unet)


def test_vae_override_from_folder_and_single_file(tmp_path, base_dir, other_dir, other_vae):
    save_vae_single_file(tmp_path / "vae.safetensors", other_vae, "float")
    with safe_open(tmp_path / "vae.safetensors", "pt") as f:
        assert "encoder.mid.attn_1.q.weight" in f.keys()

    for vae in (other_dir / "vae", tmp_path / "vae.safetensors"):
        components = load_components(str(base_dir), vae=str(vae))
        assert_same_weights(other_vae, components.vae)
        assert components.source.vae == str(vae)


def test_tiny_seed_and_vae_from_a_pipeline_folder(base_dir, other_dir, tiny):
    components = load_components("tiny", seed=1, vae=str(base_dir))
    assert_same_weights(UNet2DConditionModel.from_pretrained(other_dir / "unet"), components.unet)
    assert not torch.equal(components.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert_same_weights(tiny.vae, components.vae)


# bf16 mixed precision with a float32 VAE (no_half_vae); the same with bf16 U-Net weights (full_bf16)
MIXED = {"unet": torch.float32, "vae": torch.float32, "default": torch.bfloat16}
LEAN = {"unet": torch.bfloat16, "vae": torch.float32, "default": torch.bfloat16}


@pytest.mark.parametrize("dtypes", [MIXED, LEAN], ids=["mixed", "lean"])
@pytest.mark.parametrize("kind", ["tiny", "folder", "file"])
def test_each_component_loads_in_its_own_dtype(kind, dtypes, base_dir, single_file, tiny):
    base = {"tiny": "tiny", "folder": str(base_dir), "file": str(single_file)}[kind]
    extra = {"single_file_config": str(base_dir)} if kind == "file" else {}
    components = load_components(base, dtype=dtypes, **extra)
    for component in COMPONENTS:
        dtype = dtype_of(dtypes, component)
        assert getattr(components, component).dtype == dtype, component
        assert_same_weights(getattr(tiny, component), getattr(components, component), dtype)


def test_a_given_unet_keeps_its_dtype(base_dir, tiny):
    pipe = pipeline_from_source(ModelSource(base=str(base_dir)), dtype=torch.float16, unet=tiny.unet)
    assert pipe.unet is tiny.unet and tiny.unet.dtype == torch.float32
    assert pipe.vae.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float16


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "vae", "named"),
    [
        ("/no/such/sdxl", None, "/no/such/sdxl"),
        ("/no/such/sdxl.safetensors", None, "/no/such/sdxl.safetensors"),
        ("tiny", "/no/such/vae", "/no/such/vae"),
        ("tiny", "/no/such/vae.safetensors", "/no/such/vae.safetensors"),
    ],
)
def test_missing_path_is_one_line_naming_it(base, vae, named):
    with pytest.raises(PipelineError) as exc_info:
        load_components(base, vae=vae)
    assert_one_line_error(exc_info, named, "no such file or folder")


def test_unusable_sources_are_one_line_errors(tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError) as exc_info:
        load_components(str(tmp_path / "empty"))
    assert_one_line_error(exc_info, str(tmp_path / "empty"), "model_index.json")

    with pytest.raises(PipelineError) as exc_info:
        load_components("postertune/not-cached", cache_dir=tmp_path / "hub")
    assert_one_line_error(exc_info, "postertune/not-cached", "cannot load")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(PipelineError) as exc_info:
        load_components(str(corrupt), single_file_config=str(base_dir))
    assert_one_line_error(exc_info, str(corrupt), "cannot load")

    with pytest.raises(PipelineError) as exc_info:
        load_pipeline(str(base_dir), tmp_path / "no-unet")
    assert_one_line_error(exc_info, str(tmp_path / "no-unet"), "no such folder")


# --- models/base and load_pipeline ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_unet_dir(store, tiny) -> Path:
    """A U-Net saved as training does, with weights unlike the base's."""
    unet = UNet2DConditionModel.from_config(tiny.unet.config)
    return save_unet(unet, store / "unet", "fp16")


def test_tiny_base_folder_is_a_full_diffusers_folder(tmp_path, tiny, trained_unet_dir):
    folder = save_base_folder(ModelSource(base="tiny", seed=0), tmp_path / "base")
    assert (folder / "model_index.json").is_file()

    trained = UNet2DConditionModel.from_pretrained(trained_unet_dir)
    plain = StableDiffusionXLPipeline.from_pretrained(folder, unet=trained)
    ours = load_pipeline(folder, trained_unet_dir)
    for pipe in (plain, ours):
        assert_same_weights(trained, pipe.unet)
        for component in ("vae", "text_encoder", "text_encoder_2"):
            assert_same_weights(getattr(tiny, component), getattr(pipe, component))


def test_real_base_folder_is_a_pointer(tmp_path, single_file, base_dir, other_dir, other_vae, tiny, trained_unet_dir):
    source = ModelSource(base=str(single_file), vae=str(other_dir / "vae"), single_file_config=str(base_dir))
    folder = save_base_folder(source, tmp_path / "base")
    assert [p.name for p in folder.iterdir()] == [POINTER_FILE]

    pipe = load_pipeline(folder, trained_unet_dir, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert_same_weights(UNet2DConditionModel.from_pretrained(trained_unet_dir), pipe.unet, torch.bfloat16)
    assert_same_weights(other_vae, pipe.vae, torch.bfloat16)
    assert_same_weights(tiny.text_encoder_2, pipe.text_encoder_2, torch.bfloat16)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"model": "x"}', "model: unknown parameter"),
        ('{"base": 5}', "base: expected a string"),
    ],
)
def test_broken_pointer_is_one_line_error(tmp_path, text, problem):
    (tmp_path / POINTER_FILE).write_text(text)
    with pytest.raises(PipelineError) as exc_info:
        load_pipeline(tmp_path)
    assert_one_line_error(exc_info, str(tmp_path / POINTER_FILE), problem)
