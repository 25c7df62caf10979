"""The diffusion loss: the prediction target, the per-element loss, and the per-timestep weight.

Min-SNR-γ (Hang et al. 2023) and debiased estimation (kohya-ss, after Yu et al. 2024) are
weights on the epsilon loss. A v-prediction loss is the epsilon loss times (SNR + 1) / SNR,
so each weight is carried over by SNR / (SNR + 1): min(SNR, γ) / (SNR + 1), as the paper
gives it, and √SNR / (SNR + 1) (kohya-ss uses 1 / (SNR + 1) there, which is plain x₀ weighting).
Both stay finite at zero SNR, the last step of a zero-terminal-SNR schedule, where they are 0;
epsilon prediction never meets zero SNR (the params refuse it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from postertune.train.params import TrainParams

DEBIASED_SNR_CAP = 1000.0  # kohya-ss clamps the SNR there before 1/√SNR


@dataclass(frozen=True)
class LossRecipe:
    snr_gamma: float | None = None
    debiased: bool = False
    loss_type: str = "l2"  # l2 | huber | smooth_l1
    huber_schedule: str = "snr"  # constant | exponential | snr
    huber_c: float = 0.1

    @classmethod
    def from_params(cls, params: TrainParams) -> LossRecipe:
        return cls(
            params.snr_gamma, params.debiased_estimation_loss, params.loss_type, params.huber_schedule, params.huber_c
        )


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, γ) / SNR per sample; v-prediction divides by SNR + 1."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def debiased_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """1 / √SNR per sample, SNR capped at 1000; v-prediction: √SNR / (SNR + 1)."""
    snr = compute_snr(scheduler, timesteps)
    root = snr.clamp(max=DEBIASED_SNR_CAP).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return root / (snr + 1)
    return 1 / root


def huber_threshold(scheduler, timesteps: torch.Tensor, schedule: str, c: float) -> torch.Tensor:
    """kohya-ss's ``huber_c`` per sample: ``constant``; ``exponential``, from 1 at t = 0 down to c
    at the last step; ``snr``, from about 1 where the image is clean down to c where it is noise."""
    if schedule == "constant":
        return torch.full(timesteps.shape, c, device=timesteps.device)
    if schedule == "exponential":
        return c ** (timesteps.float() / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # infinite at zero SNR, where the threshold is c
        return (1 - c) / (1 + sigma) ** 2 + c
    raise ValueError(f"unsupported huber_schedule {schedule!r}")


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error, or kohya-ss's pseudo-Huber forms with threshold ``c`` per sample:
    ``huber`` 2c(√(r² + c²) − c), about r² near 0 and 2c|r| far out; ``smooth_l1`` the same / c."""
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_type == "l2":
        return squared
    c = c.view(-1, *([1] * (squared.ndim - 1)))
    root = squared / ((squared + c**2).sqrt() + c)  # √(r² + c²) − c, without cancellation near r = 0
    if loss_type == "huber":
        return 2 * c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unsupported loss_type {loss_type!r}")


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, recipe: LossRecipe
) -> torch.Tensor:
    c = None
    if recipe.loss_type != "l2":
        c = huber_threshold(scheduler, timesteps, recipe.huber_schedule, recipe.huber_c)
    per_sample = elementwise_loss(prediction, target, recipe.loss_type, c).mean(dim=tuple(range(1, prediction.ndim)))
    if recipe.snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, recipe.snr_gamma)
    elif recipe.debiased:
        per_sample = per_sample * debiased_weights(scheduler, timesteps)
    return per_sample.mean()
