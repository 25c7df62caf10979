"""One training step on a batch of cached latents: forward, loss, backward, update.

``training_step`` touches nothing but the batch, the U-Net, the noise schedule and the
optimizer, so a benchmark can drive it with synthetic latents and embeddings.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from postertune.errors import PipelineError
from postertune.models.prompts import PromptEncoder
from postertune.train.loss import LossRecipe, diffusion_loss, diffusion_target

BATCH_TENSORS = ("latent", "noise", "timestep", "time_ids", "prompt_embeds", "pooled_prompt_embeds")
OPTIONAL_TENSORS = ("input_noise",)  # under input perturbation only
IMAGE_TENSORS = ("latent", "noise", "input_noise")  # channels-last when the U-Net is


@dataclass(frozen=True)
class StepConfig:
    loss: LossRecipe = LossRecipe()
    max_grad_norm: float = 0.0
    fused_backward_pass: bool = False  # the optimizer already stepped inside backward
    channels_last: bool = False


@dataclass(frozen=True)
class TextTraining:
    """Text encoders that train: each step encodes its captions, with gradients."""

    encode: PromptEncoder  # on the encoders as accelerate prepared them
    models: tuple[torch.nn.Module, ...]  # the prepared encoders that train


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The batch's tensors on ``device``; captions still to encode come along as they are."""
    keys = tuple(k for k in BATCH_TENSORS if k in batch) + tuple(k for k in OPTIONAL_TENSORS if k in batch)
    moved = {k: batch[k].to(device, non_blocking=True) for k in keys}
    if "captions" in batch:
        moved["captions"] = batch["captions"]
    if channels_last:
        for key in IMAGE_TENSORS:
            if key in moved:
                moved[key] = moved[key].contiguous(memory_format=torch.channels_last)
    return moved


def denoise(unet, batch: dict, noise_scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's prediction for the noised latents, and what it should have predicted (from
    ``noise``, also when the latents were noised with a perturbed ``input_noise``)."""
    latents, noise, timesteps = batch["latent"], batch["noise"], batch["timestep"]
    noisy = noise_scheduler.add_noise(latents, batch.get("input_noise", noise), timesteps)
    prediction = unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch["prompt_embeds"],
        added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"]},
        return_dict=False,
    )[0]
    return prediction, diffusion_target(noise_scheduler, latents, noise, timesteps)


@dataclass
class StepResult:
    loss: float  # mean over every process's micro-batch
    grad_norm: float | None  # before clipping; only on steps that update the weights


def training_step(
    batch: dict,
    unet,
    noise_scheduler,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    config: StepConfig,
    step: int,
    text: TextTraining | None = None,
) -> StepResult:
    """One micro-batch; the weights change when ``accelerator`` has accumulated enough of them."""
    trained = (unet, *text.models) if text is not None else (unet,)
    with accelerator.accumulate(*trained):
        with accelerator.autocast():
            if text is not None:
                embeds, pooled = text.encode.encode(batch["captions"])
                batch = {**batch, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            prediction, target = denoise(unet, batch, noise_scheduler)
        loss = diffusion_loss(prediction, target, batch["timestep"], noise_scheduler, config.loss)
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(mean_loss):
            raise PipelineError(
                f"train: loss is {mean_loss} at step {step}: likely an fp16 VAE overflow (use the fp16-fix VAE "
                "via train.vae, or train.no_half_vae: true) or a learning rate too high (train.learning_rate)"
            )
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and config.max_grad_norm:
            weights = itertools.chain.from_iterable(model.parameters() for model in trained)
            norm = accelerator.clip_grad_norm_(weights, config.max_grad_norm)
            grad_norm = None if norm is None else float(norm)  # DeepSpeed clips inside and reports none
        if not config.fused_backward_pass:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, grad_norm)
