"""Before the first step: check params and data, start accelerate, set the noise schedule, place the
models, fill the caches."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from postertune.models.loading import SDXLComponents
from postertune.models.precision import compute_dtype
from postertune.models.prompts import PromptEncoder
from postertune.models.schedule import inference_scheduler, training_scheduler
from postertune.models.sources import validate_model_source
from postertune.params import ParamError
from postertune.store import ShardStore
from postertune.train.captions import CaptionPolicy
from postertune.train.data import Example, plan_entries, read_examples, split_validation
from postertune.train.latent_cache import LatentCache, LatentEntry, vae_cache_id
from postertune.train.params import TrainParams, check_runtime
from postertune.train.text import TextCache

log = logging.getLogger(__name__)

SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


@dataclass(frozen=True)
class Inputs:
    train: list[Example]
    validation: list[Example]


def check_inputs(params: TrainParams) -> Inputs:
    """Everything that can fail on bad params or data, checked before any model loads."""
    validate_model_source("train.base", params.base)
    if params.vae is not None:
        validate_model_source("train.vae", params.vae)
    check_runtime(params, torch.cuda.is_available())
    examples = read_examples(params.captions)
    store = ShardStore(params.shards)
    absent = [e.sha256 for e in examples if e.sha256 not in store]
    if absent:
        raise ParamError("train.shards", f"{params.shards}: {len(absent)} captioned image(s) missing, e.g. {absent[0]}")
    train, validation = split_validation(examples, params.validation.split)
    return Inputs(train, validation)


def make_accelerator(params: TrainParams) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        dynamo_backend="inductor" if params.torch_compile else None,
        step_scheduler_with_optimizer=False,  # the schedule steps once per optimizer step, whatever the process count
    )
    if params.fused_backward_pass and accelerator.num_processes > 1:
        raise ParamError("train.fused_backward_pass", "steps before gradients are averaged: one process only")
    if accelerator.distributed_type in SHARDED:
        if params.use_ema:
            raise ParamError("train.use_ema", "not available with sharded training (FSDP, DeepSpeed)")
        if params.samples.every_n_steps:
            raise ParamError("train.samples.every_n_steps", "must be 0 with sharded training (FSDP, DeepSpeed)")
        for name in ("train_text_encoder", "block_lr"):
            if getattr(params, name):
                raise ParamError(f"train.{name}", "not available with sharded training (FSDP, DeepSpeed)")
    return accelerator


def set_schedule(params: TrainParams, components: SDXLComponents) -> None:
    """Train (and sample during training) with the recipe's prediction type and noise schedule."""
    base = components.noise_scheduler.config
    wanted = (params.prediction_type, params.rescale_betas_zero_snr)
    if (base.prediction_type, base.get("rescale_betas_zero_snr", False)) != wanted:
        log.warning(
            "the base predicts %s (zero terminal SNR: %s); this run retrains it to predict %s (zero terminal SNR: %s)",
            base.prediction_type,
            base.get("rescale_betas_zero_snr", False),
            *wanted,
        )
    components.noise_scheduler = training_scheduler(base, *wanted)
    components.scheduler = inference_scheduler(components.scheduler, *wanted)


def component_dtypes(params: TrainParams) -> dict[str, torch.dtype]:
    """The dtype each component trains or computes in, so that each loads in it directly: the frozen
    VAE and text encoders in half precision under mixed precision (the VAE in float32 with
    ``no_half_vae``), the U-Net and any text encoder that trains in float32 master weights (bf16
    with ``full_bf16``)."""
    frozen = compute_dtype(params.mixed_precision)
    master = torch.bfloat16 if params.full_bf16 else torch.float32
    return {
        "unet": master,
        "vae": torch.float32 if params.no_half_vae else frozen,
        **{name: master for name in params.text_encoder_rates},  # text encoders that train
        "default": frozen,  # the frozen text encoders
    }


def place_models(params: TrainParams, components: SDXLComponents, device: torch.device) -> None:
    """Freeze and place the VAE and text encoders; make every U-Net weight trainable."""
    for frozen in (components.vae, components.text_encoder, components.text_encoder_2):
        frozen.requires_grad_(False).eval().to(device)
    unet = components.unet
    # a bucket side must survive the VAE's and then the U-Net's downsamplings without remainder
    multiple = 2 ** (len(components.vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    if params.bucket_step % multiple:
        raise ParamError("train.bucket_step", f"must be a multiple of {multiple} for this VAE and U-Net")
    unet.requires_grad_(True).train()
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if params.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.to(device)
    if not all(p.requires_grad for p in unet.parameters()):
        raise AssertionError("every U-Net parameter must train")


@dataclass(frozen=True)
class Caches:
    plans: list[list[LatentEntry]]  # per example (train, then validation): its cached crops
    latents: LatentCache
    texts: TextCache | None  # None when captions change from step to step
    encode: PromptEncoder | None  # None once the text encoders are freed (``release_frozen``)
    policy: CaptionPolicy


def fill_caches(params: TrainParams, inputs: Inputs, components: SDXLComponents, accelerator: Accelerator) -> Caches:
    """Encode what is not cached yet, each process a share."""
    share = slice(accelerator.process_index, None, accelerator.num_processes)
    show = accelerator.is_main_process
    plans = plan_entries(inputs.train + inputs.validation, params)
    latents = LatentCache(params.cache_dir, vae_cache_id(components.vae, components.vae.dtype, params.background))
    entries = [entry for plan in plans for entry in plan]
    with ShardStore(params.shards) as store:
        latents.fill(
            entries[share], store, components.vae, params.batch_size, params.max_image_pixels, show, params.background
        )
    encode = PromptEncoder(
        components.tokenizer,
        components.tokenizer_2,
        components.text_encoder,
        components.text_encoder_2,
        params.max_token_length,
    )
    policy = CaptionPolicy.from_params(params)
    texts = None
    if params.train_text_encoder and show:
        log.info("text encoders train: captions are encoded at every step, not cached")
    if params.caches_text:
        texts = TextCache(params.cache_dir, encode.cache_id)
        captions = [policy.fixed(e.caption, e.caption_long) for e in inputs.train]
        texts.fill(captions[share], encode, params.batch_size, show)
    accelerator.wait_for_everyone()
    return Caches(plans, latents, texts, encode, policy)


def release_frozen(params: TrainParams, components: SDXLComponents, caches: Caches) -> Caches:
    """Once the caches are filled, keep the VAE and text encoders only where a later step uses them.

    Text encoders stay on the device when captions change from step to step (each step encodes
    its own); the VAE, and text encoders needed only for training-time samples, wait on the CPU
    (``sampling.frozen_on``); the rest are freed. The final save reloads what it writes.
    """
    sampling = bool(params.samples.every_n_steps and params.samples.prompts)
    if sampling:
        components.vae.to("cpu")
    else:
        components.vae = None
    if caches.texts is None:
        return caches
    if sampling:
        components.text_encoder.to("cpu")
        components.text_encoder_2.to("cpu")
        return caches
    components.text_encoder = components.text_encoder_2 = None
    return replace(caches, encode=None)
