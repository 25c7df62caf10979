"""One image from an SDXL pipeline, reproducible from its seed on any device."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from postertune.models.prompts import PromptEncoder


@torch.no_grad()
def render(
    pipe: StableDiffusionXLPipeline,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    max_token_length: int,
    *,
    guidance_rescale: float = 0.0,
) -> Image.Image:
    """The prompts are encoded here, in ``max_token_length`` chunks as training encodes captions;
    an empty negative prompt is zeros where the model says so (SDXL base), as diffusers does.
    ``guidance_rescale`` (Lin et al. 2024) tempers the over-exposure that classifier-free
    guidance gives a zero-terminal-SNR model; 0 leaves the guided prediction as it is."""
    encode = PromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, max_token_length)
    embeds, pooled = encode([prompt])
    if not negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = encode([negative_prompt])
    dtype = pipe.text_encoder_2.dtype
    # A CPU generator gives the same starting noise on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(
        prompt_embeds=embeds.to(dtype),
        pooled_prompt_embeds=pooled.to(dtype),
        negative_prompt_embeds=negative.to(dtype),
        negative_pooled_prompt_embeds=negative_pooled.to(dtype),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        width=width,
        height=height,
        generator=generator,
    )
    return result.images[0]
