"""Sample images during training, with fixed prompts and seeds, to watch the fine-tune change."""

from __future__ import annotations

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
