"""The diffusion loss: offset noise, the prediction target, and min-SNR-γ weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def draw_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise for one latent (C, H, W); ``noise_offset`` adds a per-channel constant so
    the model can learn images whose mean brightness is far from mid-grey."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((shape[0], 1, 1), generator=generator)
    return noise


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, γ) / SNR per sample (Hang et al. 2023); v-prediction divides by SNR + 1."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, snr_gamma: float | None
) -> torch.Tensor:
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    return per_sample.mean()
