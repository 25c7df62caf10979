"""The fine-tune from top to bottom: check, load, cache, train, validate, sample, save.

Runs the same on one CPU, one GPU, or many GPUs and nodes under ``accelerate launch``.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from postertune.models.loading import SDXLComponents, load_components, save_base_folder, save_unet
from postertune.models.single_file import save_single_file
from postertune.models.sources import validate_model_source
from postertune.params import ParamError
from postertune.store import ShardStore
from postertune.train.buckets import make_buckets, nearest_bucket
from postertune.train.captions import CaptionPolicy
from postertune.train.checkpoint import Checkpoints
from postertune.train.config import TrainParams, check_runtime
from postertune.train.data import (
    BucketBatchSampler,
    Example,
    TrainDataset,
    collate,
    plan_entries,
    read_examples,
    split_validation,
)
from postertune.train.ema import UNetEMA
from postertune.train.fingerprint import fingerprint_json, fingerprint_module
from postertune.train.latent_cache import LatentCache, vae_cache_id
from postertune.train.optim import fuse_into_backward, make_lr_scheduler, make_optimizer
from postertune.train.sampling import SampleSpec, sample_images
from postertune.train.step import StepConfig, to_device, training_step
from postertune.train.text import PromptEncoder, TextCache
from postertune.train.tracking import TrainLog
from postertune.train.validation import build_validation_batches, validation_loss

log = logging.getLogger(__name__)

LIVE_DIR = Path("dvclive/train")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POSTER_ASPECT = (2, 3)  # sample images default to the bucket nearest a 2:3 poster


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
    train, validation = split_validation(examples, params.validation_split)
    return Inputs(train, validation)


def make_accelerator(params: TrainParams) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        dynamo_backend="inductor" if params.torch_compile else None,
        step_scheduler_with_optimizer=False,
    )
    if params.fused_backward_pass and accelerator.num_processes > 1:
        raise ParamError(
            "train.fused_backward_pass", "steps before gradients are averaged across processes: one process only"
        )
    if params.use_ema and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ParamError("train.use_ema", "not supported with sharded training (FSDP, DeepSpeed)")
    return accelerator


def place_models(params: TrainParams, components: SDXLComponents, device: torch.device) -> torch.dtype:
    """Freeze and place the VAE and text encoders; make every U-Net weight trainable. Returns the VAE dtype."""
    weight_dtype = DTYPES[params.mixed_precision]
    vae_dtype = torch.float32 if params.no_half_vae else weight_dtype
    for frozen, dtype in (
        (components.vae, vae_dtype),
        (components.text_encoder, weight_dtype),
        (components.text_encoder_2, weight_dtype),
    ):
        frozen.requires_grad_(False).eval().to(device, dtype)
    unet = components.unet
    unet.requires_grad_(True).train()
    if params.full_bf16:
        unet.to(torch.bfloat16)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if params.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.to(device)
    assert all(p.requires_grad for p in unet.parameters()), "every U-Net parameter must train"
    return vae_dtype


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(params: TrainParams) -> dict | None:
    """Fine-tune, write ``models/`` and the DVCLive logs; return the numbers for ``metrics/train.json``
    (on the main process; ``None`` on the others)."""
    inputs = check_inputs(params)
    accelerator = make_accelerator(params)
    main = accelerator.is_main_process
    device = accelerator.device

    components = load_components(params.base, params.vae, seed=params.seed)
    vae_dtype = place_models(params, components, device)
    unet, noise_scheduler = components.unet, components.noise_scheduler
    trainable = sum(p.numel() for p in unet.parameters())

    # Latents and (when captions never change) text embeddings, cached once on disk.
    examples = inputs.train + inputs.validation
    plans = plan_entries(examples, params)
    latents = LatentCache(params.cache_dir, vae_cache_id(components.vae, vae_dtype))
    entries = [entry for plan in plans for entry in plan]
    shard = entries[accelerator.process_index :: accelerator.num_processes]
    latents.fill(shard, ShardStore(params.shards), components.vae, params.batch_size, params.max_image_pixels, main)
    encode = PromptEncoder(
        components.tokenizer, components.tokenizer_2, components.text_encoder, components.text_encoder_2
    )
    policy = CaptionPolicy.from_params(params)
    texts = None
    if not params.augments_captions:
        texts = TextCache(params.cache_dir, encode.cache_id())
        captions = [policy.fixed(e.caption, e.caption_long) for e in inputs.train]
        texts.fill(captions[accelerator.process_index :: accelerator.num_processes], encode, params.batch_size, main)
    accelerator.wait_for_everyone()
    components.vae.to("cpu")  # only sampling needs it again

    # One id for this recipe: params that shape the weights, the data, the base model.
    global_batch = params.batch_size * accelerator.num_processes * params.gradient_accumulation_steps
    identity = {
        "params": params.identity(),
        "global_batch": global_batch,
        "data": fingerprint_json([(e.sha256, e.caption, e.caption_long) for e in inputs.train]),
        "unet": fingerprint_module(unet)[:16],
        "vae": latents.folder.name,
        "text_encoders": encode.cache_id(),
    }
    checkpoints = Checkpoints(
        params.output_dir / "checkpoints", fingerprint_json(identity), params.checkpoints_total_limit
    )

    optimizer = make_optimizer(params, unet.parameters())
    lr_scheduler = make_lr_scheduler(params, optimizer)
    ema = (
        UNetEMA(unet, params.ema_decay, torch.device("cpu") if params.ema_device == "cpu" else device)
        if params.use_ema
        else None
    )
    if params.fused_backward_pass:
        fuse_into_backward(optimizer, unet.parameters())
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema.model)

    state = {"step": 0, "images_seen": 0, "train_loss": None}
    latest = checkpoints.latest() if params.resume == "auto" else None
    if latest is not None:
        state = checkpoints.load(accelerator, latest)
        if main:
            log.info("resuming from %s", latest)
    start_step = state["step"]

    sampler = BucketBatchSampler(
        [plan[0].crop.bucket for plan in plans[: len(inputs.train)]],
        params.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        params.seed,
    )
    sampler.start = start_step * params.gradient_accumulation_steps
    dataset = TrainDataset(
        inputs.train,
        plans[: len(inputs.train)],
        latents,
        texts,
        policy,
        params.noise_offset,
        noise_scheduler.config.num_train_timesteps,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=params.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )
    validation = build_validation_batches(
        inputs.validation,
        plans[len(inputs.train) :],
        latents,
        encode,
        policy,
        params.validation_timesteps,
        params.seed,
    )
    tracker = TrainLog(LIVE_DIR, start_step if latest is not None else None, main)
    step_config = StepConfig(params.snr_gamma, params.max_grad_norm, params.fused_backward_pass, params.channels_last)

    def evaluate(step: int) -> float | None:
        if not validation:
            return None
        value = validation_loss(unet, validation, noise_scheduler, accelerator)
        tracker.metrics(step, {"val/loss": value})
        return value

    def sample(step: int) -> None:
        if main and params.sample_prompts:
            components.vae.to(device)
            with accelerator.autocast():
                images = sample_images(components, accelerator.unwrap_model(unet), sample_spec(params))
            components.vae.to("cpu")
            tracker.images(step, images)
        accelerator.wait_for_everyone()

    val_loss = evaluate(start_step) if start_step == 0 else None
    step, saved_step, val_step = start_step, start_step, start_step
    window: list[float] = []
    busy_seconds, images_this_run = 0.0, 0
    progress = tqdm(total=params.max_train_steps, initial=start_step, desc="training", disable=not main)
    started = time.perf_counter()
    for batch in loader:
        if step >= params.max_train_steps:
            break
        if "captions" in batch:
            batch["prompt_embeds"], batch["pooled_prompt_embeds"] = encode(batch.pop("captions"))
        result = training_step(
            to_device(batch, device, params.channels_last),
            unet,
            noise_scheduler,
            optimizer,
            accelerator,
            step_config,
            step + 1,
        )
        window.append(result.loss)
        if not accelerator.sync_gradients:
            continue
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        if ema is not None:
            ema.update(list(accelerator.unwrap_model(unet).parameters()))
        step += 1
        images_this_run += global_batch
        busy_seconds += time.perf_counter() - started
        state = {
            "step": step,
            "images_seen": state["images_seen"] + global_batch,
            "train_loss": sum(window) / len(window),
        }
        window.clear()
        metrics = {
            "train/loss": state["train_loss"],
            "train/lr": lr_scheduler.get_last_lr()[0],
            "train/images_per_s": images_this_run / busy_seconds,
            "train/peak_memory_mb": peak_memory_mb(device),
        }
        if result.grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norm
        tracker.metrics(step, metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{state['train_loss']:.4f}")
        if params.validation_every_n_steps and step % params.validation_every_n_steps == 0:
            val_loss, val_step = evaluate(step), step
        if params.sample_every_n_steps and step % params.sample_every_n_steps == 0:
            sample(step)
        if params.checkpointing_steps and step % params.checkpointing_steps == 0:
            checkpoints.save(accelerator, state, identity)
            saved_step = step
        started = time.perf_counter()
    progress.close()

    if step != saved_step:
        checkpoints.save(accelerator, state, identity)
    if val_loss is None or val_step != step:
        val_loss = evaluate(step)
    tracker.close()
    if main:
        save_outputs(params, components, accelerator.unwrap_model(unet), ema)
    accelerator.wait_for_everyone()

    metrics = {
        "steps": step,
        "images_seen": state["images_seen"],
        "images_per_s": images_this_run / busy_seconds if busy_seconds else 0.0,
        "peak_memory_mb": peak_memory_mb(device),
        "trainable_params": trainable,
    }
    if state["train_loss"] is not None:
        metrics["train_loss"] = state["train_loss"]
    if val_loss is not None:
        metrics["val_loss"] = val_loss
    return metrics if main else None


def sample_spec(params: TrainParams) -> SampleSpec:
    buckets = make_buckets(
        params.resolution, params.bucket_step, params.min_bucket_reso, params.max_bucket_reso, params.max_aspect_ratio
    )
    size = nearest_bucket(*POSTER_ASPECT, buckets)
    return SampleSpec(
        params.sample_prompts,
        params.sample_negative_prompt,
        params.sample_seed,
        params.sample_steps,
        params.sample_guidance_scale,
        size.width,
        size.height,
    )


def save_outputs(params: TrainParams, components: SDXLComponents, unet, ema: UNetEMA | None) -> None:
    """``models/unet`` (diffusers), the single-file checkpoint, and ``models/base`` for sampling."""
    if ema is not None:
        ema.copy_to(list(unet.parameters()))
    out = params.output_dir
    save_unet(unet, out / "unet", params.save_precision)
    components.vae.to(torch.float32)
    save_single_file(
        out / "sdxl-poster.safetensors",
        unet,
        components.vae,
        components.text_encoder,
        components.text_encoder_2,
        params.save_precision,
    )
    save_base_folder(components.source, out / "base")
