"""One-file SDXL checkpoints in the original (Stability/LDM) key layout.

ComfyUI, AUTOMATIC1111 and kohya-ss load SDXL as a single ``.safetensors`` with four
parts under fixed prefixes:

- ``model.diffusion_model.``: the U-Net (``input_blocks``/``middle_block``/``output_blocks``)
- ``first_stage_model.``: the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` with 1×1 convs)
- ``conditioner.embedders.0.transformer.``: CLIP ViT-L, in transformers' own layout
- ``conditioner.embedders.1.model.``: OpenCLIP ViT-bigG (fused q/k/v, transposed projection)

``StableDiffusionXLPipeline.from_single_file`` reads such a file back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from postertune.atomic import atomic_path
from postertune.models.ldm_keys import open_clip_prefix_map, rename, unet_prefix_map, vae_prefix_map
from postertune.models.precision import Precision
from postertune.models.safetensors_writer import Pending, cast_when_written, write_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# ModelSpec metadata, which kohya-ss and others read to recognise the architecture.
SDXL_METADATA = {
    "format": "pt",
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    prefix_map = unet_prefix_map(unet.config)
    return {rename(key, prefix_map): t for key, t in unet.state_dict().items()}


def vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    prefix_map = vae_prefix_map(vae.config)
    out = {}
    for key, t in vae.state_dict().items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]  # linear → 1×1 conv
        out[rename(key, prefix_map)] = t
    return out


def _text_model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict keyed without ``text_model.``, whichever way transformers nests it."""
    return {key.removeprefix("text_model."): t for key, t in model.state_dict().items()}


def clip_l_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    return {f"text_model.{key}": t for key, t in _text_model_tensors(text_encoder).items()}


def open_clip_to_original(text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    tensors = _text_model_tensors(text_encoder_2)
    layers = text_encoder_2.config.num_hidden_layers
    prefix_map = open_clip_prefix_map(layers)
    out = {
        "positional_embedding": tensors.pop("embeddings.position_embedding.weight"),
        "text_projection": tensors.pop("text_projection.weight").T,
    }
    for n in range(layers):
        attn = f"encoder.layers.{n}.self_attn"
        for kind in ("weight", "bias"):
            qkv = [tensors.pop(f"{attn}.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(qkv)
    out.update({rename(key, prefix_map): t for key, t in tensors.items()})
    return out


def original_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
) -> dict[str, torch.Tensor]:
    """All four SDXL components as one state dict in the original key layout."""
    parts = [
        (UNET_PREFIX, unet_to_original(unet)),
        (VAE_PREFIX, vae_to_original(vae)),
        (CLIP_L_PREFIX, clip_l_to_original(text_encoder)),
        (OPEN_CLIP_PREFIX, open_clip_to_original(text_encoder_2)),
    ]
    return {prefix + key: t for prefix, tensors in parts for key, t in tensors.items()}


def save_single_file(
    path: Path | str,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    precision: Precision,
) -> Path:
    """Write one SDXL checkpoint ``.safetensors`` (original layout) in ``precision``, atomically,
    one tensor at a time (no second copy of the models)."""
    tensors = cast_when_written(original_state_dict(unet, vae, text_encoder, text_encoder_2), precision)
    return _save(path, tensors, SDXL_METADATA)


def save_vae_single_file(path: Path | str, vae: AutoencoderKL, precision: Precision) -> Path:
    """Write a VAE alone as a single ``.safetensors`` in the original layout (no prefix)."""
    return _save(path, cast_when_written(vae_to_original(vae), precision), {"format": "pt"})


def _save(path: Path | str, tensors: dict[str, Pending], metadata: dict[str, str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        write_safetensors(tmp, tensors, metadata)
    return path
