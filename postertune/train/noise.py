"""The noise a training sample is diffused with, drawn from the sample's own seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from postertune.train.params import TrainParams


@dataclass(frozen=True)
class NoiseRecipe:
    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    input_perturbation: float = 0.0

    @classmethod
    def from_params(cls, params: TrainParams) -> NoiseRecipe:
        return cls(
            params.noise_offset,
            params.multires_noise_iterations,
            params.multires_noise_discount,
            params.input_perturbation,
        )


def draw_noise(shape: torch.Size, generator: torch.Generator, recipe: NoiseRecipe) -> torch.Tensor:
    """Gaussian noise for one latent (C, H, W). ``offset`` adds a per-channel constant so the
    model can learn images whose mean brightness is far from mid-grey; multires noise then
    adds coarser noise on top (kohya-ss's order)."""
    noise = torch.randn(shape, generator=generator)
    if recipe.offset:
        noise += recipe.offset * torch.randn((shape[0], 1, 1), generator=generator)
    if recipe.multires_iterations:
        noise = pyramid_noise(noise, generator, recipe.multires_iterations, recipe.multires_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023; kohya-ss ``--multires_noise_iterations``): to ``noise``
    add, for scale i = 0, 1, …, fresh noise at 1/rⁱ of the size, r drawn from U(2, 4) per scale,
    upsampled bilinearly and weighted by discountⁱ, stopping at 1×1; then rescale to unit std.

    The low frequencies it adds make the model learn large-scale colour and layout, which plain
    per-pixel noise destroys only at the last timesteps.
    """
    channels, height, width = noise.shape
    total = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        h, w = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = torch.randn((1, channels, h, w), generator=generator)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**i
        if h == 1 or w == 1:
            break
    return total / total.std()


def perturb(noise: torch.Tensor, generator: torch.Generator, gamma: float) -> torch.Tensor:
    """The noise the latents are diffused with under input perturbation (Ning et al. 2023): the
    model sees noise + γ·N(0, 1) but is trained to recover ``noise``, which narrows the gap
    between training inputs and its own slightly wrong inputs while sampling."""
    return noise + gamma * torch.randn(noise.shape, generator=generator)
