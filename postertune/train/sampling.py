"""Sample images during training, with fixed prompts and seeds, to watch the fine-tune change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from postertune.models.loading import SDXLComponents


@dataclass(frozen=True)
class SampleSpec:
    prompts: list[str]
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int


@torch.no_grad()
def sample_images(components: SDXLComponents, unet, spec: SampleSpec) -> dict[str, Image.Image]:
    """One image per prompt, named ``prompt-<i>``; prompt i always uses seed ``spec.seed + i``."""
    pipe = components.pipeline(unet)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for i, prompt in enumerate(spec.prompts):
        generator = torch.Generator("cpu").manual_seed(spec.seed + i)
        result = pipe(
            prompt,
            negative_prompt=spec.negative_prompt or None,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            width=spec.width,
            height=spec.height,
            generator=generator,
        )
        images[f"prompt-{i}"] = result.images[0]
    return images
