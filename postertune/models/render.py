"""One image from an SDXL pipeline, reproducible from its seed on any device."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image


def render(
    pipe: StableDiffusionXLPipeline,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    width: int,
    height: int,
) -> Image.Image:
    # A CPU generator gives the same starting noise on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        generator=generator,
    )
    return result.images[0]
