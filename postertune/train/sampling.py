"""Sample images during training, with fixed prompts and seeds, to watch the fine-tune change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from postertune.models.loading import SDXLComponents
from postertune.models.render import render


@dataclass(frozen=True)
class SampleSpec:
    prompts: list[str]
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    guidance_rescale: float
    width: int
    height: int
    max_token_length: int


@contextmanager
def frozen_on(components: SDXLComponents, device: torch.device) -> Iterator[None]:
    """The VAE and text encoders on ``device`` for a while: those waiting on the CPU come and go back."""
    frozen = (components.vae, components.text_encoder, components.text_encoder_2)
    away = [module for module in frozen if module.device.type != device.type]
    for module in away:
        module.to(device)
    try:
        yield
    finally:
        for module in away:
            module.to("cpu")


@torch.no_grad()
def sample_images(components: SDXLComponents, unet, spec: SampleSpec) -> dict[str, Image.Image]:
    """One image per prompt, named ``prompt-<i>``; prompt i always uses seed ``spec.seed + i``."""
    pipe = components.pipeline(unet)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for i, prompt in enumerate(spec.prompts):
        images[f"prompt-{i}"] = render(
            pipe,
            prompt,
            spec.negative_prompt,
            spec.seed + i,
            spec.steps,
            spec.guidance_scale,
            spec.width,
            spec.height,
            spec.max_token_length,
            guidance_rescale=spec.guidance_rescale,
        )
    return images
