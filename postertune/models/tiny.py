"""SDXL-architecture components with tiny widths and random weights.

The demo profile and the tests use these in place of the real 3.5B-parameter model:
same classes, same block layout (three U-Net levels, two resnets each, cross-attention
on the lower two, text-time micro-conditioning, two CLIP text encoders whose
penultimate states are concatenated), only narrower. The build is deterministic for a
given seed, so two processes build bit-identical models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from postertune.models.tokenizer import clip_tokenizer

# Hidden sizes of the two text encoders; the U-Net sees their sum. They differ, as in SDXL
# (768 and 1280): diffusers' single-file loader tells the encoders apart by width.
TEXT_WIDTH = 32
TEXT_WIDTH_2 = 48
POOLED_WIDTH = 32
TIME_EMBED_WIDTH = 8

SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def tiny_unet_config() -> dict:
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED_WIDTH,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def tiny_text_config(hidden_act: str, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=POOLED_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Every SDXL component, tiny and randomly initialised from ``seed``; the real CLIP tokenizers
    (built once per process: they are read-only and the slowest part to build)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    # SDXL: CLIP ViT-L uses quick_gelu, OpenCLIP bigG uses gelu and has a projection.
    text_encoder = CLIPTextModel(tiny_text_config("quick_gelu", TEXT_WIDTH))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config("gelu", TEXT_WIDTH_2))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer("<|endoftext|>"),
        tokenizer_2=clip_tokenizer("!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )


def save_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder, loadable like the real base model."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
