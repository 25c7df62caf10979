"""Validation loss on held-out images at fixed timesteps with fixed noise.

Each held-out image is noised at every one of ``timesteps`` with noise drawn once from
a seeded generator; the plain (unweighted) MSE is averaged over all of them. The same
images, timesteps and noise at every evaluation and in every run with the same seed
make the numbers comparable across steps and across runs.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from postertune.models.prompts import PromptEncoder
from postertune.train.captions import CaptionPolicy
from postertune.train.data import Example, derive_seed
from postertune.train.latent_cache import LatentCache, LatentEntry
from postertune.train.step import denoise, to_device

VALIDATION_STREAM = 1  # keeps validation noise apart from the training draws of the same seed


def build_validation_batches(
    examples: list[Example],
    entries: list[list[LatentEntry]],
    latents: LatentCache,
    encode: PromptEncoder,
    policy: CaptionPolicy,
    timesteps: list[int],
    seed: int,
) -> list[dict]:
    """One batch per held-out image: that image at every validation timestep."""
    batches = []
    steps = torch.tensor(timesteps, dtype=torch.long)
    for example, choices in zip(examples, entries, strict=True):
        latent, time_ids = latents.load(choices[0])
        embeds, pooled = encode([policy.fixed(example.caption, example.caption_long)])
        generator = torch.Generator().manual_seed(derive_seed(seed, VALIDATION_STREAM, int(example.sha256[:15], 16)))
        count = len(timesteps)
        batches.append(
            {
                "latent": latent.expand(count, *latent.shape).clone(),
                "noise": torch.randn((count, *latent.shape), generator=generator),
                "timestep": steps,
                "time_ids": time_ids.expand(count, -1).clone(),
                "prompt_embeds": embeds.cpu().expand(count, -1, -1).clone(),
                "pooled_prompt_embeds": pooled.cpu().expand(count, -1).clone(),
            }
        )
    return batches


@torch.no_grad()
def validation_loss(unet, batches: list[dict], noise_scheduler, accelerator: Accelerator) -> float:
    total = 0.0
    for batch in batches:
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            prediction, target = denoise(unet, batch, noise_scheduler)
        total += torch.nn.functional.mse_loss(prediction.float(), target.float()).item()
    return total / len(batches)
