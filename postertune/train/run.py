"""The fine-tune from top to bottom: check, load, cache, train, validate, sample, save.

Runs the same on one CPU, one GPU, or many GPUs and nodes under ``accelerate launch``.
Everything a step trains on follows from the step number (see ``data``), so resuming
from a checkpoint continues exactly where the interrupted run was.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from postertune.fingerprint import fingerprint_json, fingerprint_module
from postertune.memory import PhaseMemory
from postertune.models.loading import (
    SDXLComponents,
    load_components,
    pipeline_from_source,
    save_base_folder,
    save_unet,
)
from postertune.models.precision import torch_dtype
from postertune.models.prompts import PromptEncoder
from postertune.models.single_file import save_single_file
from postertune.models.text_encoders import TEXT_ENCODERS, save_text_encoders
from postertune.train.buckets import make_buckets, nearest_bucket
from postertune.train.checkpoint import Checkpoints, stream_model_weights
from postertune.train.data import BucketBatchSampler, TrainDataset, collate
from postertune.train.ema import UNetEMA
from postertune.train.groups import logged_rates, param_groups, unfreeze_text_encoders
from postertune.train.loss import LossRecipe
from postertune.train.noise import NoiseRecipe
from postertune.train.optim import (
    check_optimizer_args,
    fuse_into_backward,
    make_lr_scheduler,
    make_optimizer,
    release_optimizer_state,
)
from postertune.train.params import TrainParams
from postertune.train.sampling import SampleSpec, frozen_on, sample_images
from postertune.train.setup import (
    Caches,
    Inputs,
    check_inputs,
    component_dtypes,
    fill_caches,
    make_accelerator,
    place_models,
    release_frozen,
    set_schedule,
)
from postertune.train.step import StepConfig, TextTraining, to_device, training_step
from postertune.train.timesteps import TimestepSampler
from postertune.train.tracking import TrainLog
from postertune.train.validation import build_validation_batches, validation_loss

log = logging.getLogger(__name__)

LIVE_DIR = Path("dvclive/train")
POSTER_ASPECT = (2, 3)  # samples are drawn in the bucket nearest a 2:3 poster
TINY_BASE_SEED = 0  # the demo base model's random weights stay the same whatever the training seed


def run(params: TrainParams) -> dict | None:
    """Fine-tune, write ``models/`` and the DVCLive logs; return the numbers for ``metrics/train.json``
    on the main process (``None`` on the others)."""
    check_optimizer_args(params)
    inputs = check_inputs(params)
    accelerator = make_accelerator(params)
    main, device = accelerator.is_main_process, accelerator.device
    memory = PhaseMemory(device)

    memory.start("load")
    components = load_components(params.base, params.vae, seed=TINY_BASE_SEED, dtype=component_dtypes(params))
    set_schedule(params, components)
    place_models(params, components, device)
    text_encoders = unfreeze_text_encoders(params, components)
    groups = param_groups(params, components.unet, text_encoders)

    memory.start("cache")
    caches = fill_caches(params, inputs, components, accelerator)
    unet, noise_scheduler = components.unet, components.noise_scheduler
    global_batch = params.batch_size * accelerator.num_processes * params.gradient_accumulation_steps
    identity = run_identity(params, inputs, components, caches, global_batch)
    checkpoints = Checkpoints(
        params.output_dir / "checkpoints", fingerprint_json(identity), params.checkpoints.total_limit
    )

    def validation_batches() -> list[dict]:
        return build_validation_batches(
            inputs.validation,
            caches.plans[len(inputs.train) :],
            caches.latents,
            caches.encode,
            caches.policy,
            params.validation.timesteps,
            params.seed,
        )

    validation = validation_batches()  # before the text encoders may go
    caches = release_frozen(params, components, caches)

    memory.start("train")
    optimizer = make_optimizer(params, groups)
    lr_scheduler = make_lr_scheduler(params, optimizer)
    ema = None
    if params.use_ema:
        ema = UNetEMA(unet, params.ema_decay, torch.device("cpu") if params.ema_device == "cpu" else device)
    if params.fused_backward_pass:
        fuse_into_backward(optimizer)
    unet, optimizer, *prepared = accelerator.prepare(unet, optimizer, *text_encoders.values())
    text = text_training(params, components, dict(zip(text_encoders, prepared, strict=True)))
    accelerator.register_for_checkpointing(lr_scheduler)
    stream_model_weights(accelerator)
    if ema is not None:
        accelerator.register_for_checkpointing(ema.model)

    state = {"step": 0, "images_seen": 0, "train_loss": None}
    latest = checkpoints.latest() if params.checkpoints.resume == "auto" else None
    if latest is not None:
        state = checkpoints.load(accelerator, latest)
        if main:
            log.info("resuming from %s", latest)
    start_step = state["step"]

    loader = make_loader(params, inputs, caches, accelerator, noise_scheduler.config.num_train_timesteps, start_step)
    tracker = TrainLog(LIVE_DIR, start_step if latest is not None else None, main)
    step_config = StepConfig(
        LossRecipe.from_params(params), params.max_grad_norm, params.fused_backward_pass, params.channels_last
    )

    def evaluate(step: int) -> float | None:
        if not validation:
            return None
        # while the encoders train, the captions' encodings change
        batches = validation if text is None else validation_batches()
        value = validation_loss(unet, batches, noise_scheduler, accelerator)
        tracker.metrics(step, {"val/loss": value})
        return value

    def sample(step: int) -> None:
        if main and params.samples.prompts:
            with frozen_on(components, device), accelerator.autocast():
                images = sample_images(components, accelerator.unwrap_model(unet), sample_spec(params))
            tracker.images(step, images)
        accelerator.wait_for_everyone()

    step = saved_step = val_step = start_step
    val_loss = evaluate(step) if step == 0 else None
    busy_seconds, images_this_run = 0.0, 0
    progress = tqdm(total=params.max_train_steps, initial=step, desc="training", disable=not main)
    batches = iter(loader)
    while step < params.max_train_steps:
        started = time.perf_counter()
        losses = []
        for _ in range(params.gradient_accumulation_steps):  # the last micro-batch updates the weights
            batch = next(batches)
            if "captions" in batch and text is None:
                batch["prompt_embeds"], batch["pooled_prompt_embeds"] = caches.encode(batch.pop("captions"))
            batch = to_device(batch, device, params.channels_last)
            result = training_step(batch, unet, noise_scheduler, optimizer, accelerator, step_config, step + 1, text)
            losses.append(result.loss)
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps that overflowed
            lr_scheduler.step()
        if ema is not None:
            ema.update(list(accelerator.unwrap_model(unet).parameters()))
        step += 1
        images_this_run += global_batch
        busy_seconds += time.perf_counter() - started
        train_loss = sum(losses) / len(losses)
        state = {"step": step, "images_seen": state["images_seen"] + global_batch, "train_loss": train_loss}
        metrics = {
            "train/loss": train_loss,
            **logged_rates(params, optimizer.param_groups, lr_scheduler.get_last_lr()),
            "train/images_per_s": images_this_run / busy_seconds,
            "train/peak_memory_mb": memory.peak_mb(),
        }
        if result.grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norm
        tracker.metrics(step, metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.4f}")
        if params.validation.every_n_steps and step % params.validation.every_n_steps == 0:
            val_loss, val_step = evaluate(step), step
        if params.samples.every_n_steps and step % params.samples.every_n_steps == 0:
            sample(step)
        if params.checkpoints.every_n_steps and step % params.checkpoints.every_n_steps == 0:
            checkpoints.save(accelerator, state, identity)
            saved_step = step
    progress.close()
    if val_step != step or val_loss is None:
        val_loss = evaluate(step)
    tracker.close()

    memory.start("checkpoint")
    if step != saved_step:
        checkpoints.save(accelerator, state, identity)

    memory.start("save")
    final = final_unet(accelerator, unet)
    release_optimizer_state(optimizer, [p for group in groups for p in group["params"]])
    if ema is not None:
        ema.move_to(list(final.parameters()))
    # the frozen models are reloaded to be written; the text encoders that trained are kept
    components.vae = components.text_encoder = components.text_encoder_2 = caches = None
    gc.collect()  # modules in reference cycles would otherwise wait for the collector
    if main:
        save_outputs(params, components, final, text_encoders)
    accelerator.wait_for_everyone()
    memory.stop()
    if not main:
        return None
    metrics = {
        "steps": step,
        "images_seen": state["images_seen"],
        "images_per_s": images_this_run / busy_seconds if busy_seconds else 0.0,
        "trainable_params": sum(p.numel() for group in groups for p in group["params"]),
        **memory.metrics(),
    }
    if state["train_loss"] is not None:
        metrics["train_loss"] = state["train_loss"]
    if val_loss is not None:
        metrics["val_loss"] = val_loss
    return metrics


def make_loader(
    params: TrainParams,
    inputs: Inputs,
    caches: Caches,
    accelerator: Accelerator,
    num_train_timesteps: int,
    start_step: int,
) -> torch.utils.data.DataLoader:
    """This process's micro-batches, endless, from the first one of ``start_step`` on."""
    plans = caches.plans[: len(inputs.train)]
    sampler = BucketBatchSampler(
        [plan[0].crop.bucket for plan in plans],
        params.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        params.seed,
    )
    sampler.start = start_step * params.gradient_accumulation_steps
    dataset = TrainDataset(
        inputs.train,
        plans,
        caches.latents,
        caches.texts,
        caches.policy,
        NoiseRecipe.from_params(params),
        TimestepSampler(params, num_train_timesteps),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=params.dataloader_num_workers,
        # Forked workers would share this process's pages copy-on-write: each weight a step then
        # updates in host memory gets copied, the workers keeping the old page (on a CPU, a second
        # U-Net). Workers started from a fresh server hold the dataset alone.
        multiprocessing_context="forkserver" if params.dataloader_num_workers else None,
        pin_memory=accelerator.device.type == "cuda",
    )


def text_training(
    params: TrainParams, components: SDXLComponents, prepared: dict[str, torch.nn.Module]
) -> TextTraining | None:
    """Caption encoding inside each step, through the prepared encoders, when any encoder trains."""
    if not prepared:
        return None
    encoders = {name: prepared.get(name, getattr(components, name)) for name in TEXT_ENCODERS}
    encode = PromptEncoder(
        components.tokenizer,
        components.tokenizer_2,
        encoders["text_encoder"],
        encoders["text_encoder_2"],
        params.max_token_length,
    )
    return TextTraining(encode, tuple(prepared.values()))


def run_identity(
    params: TrainParams, inputs: Inputs, components: SDXLComponents, caches: Caches, global_batch: int
) -> dict:
    """What a checkpoint must share with this run to be resumed: recipe, data, base weights."""
    return {
        "params": params.identity(),
        "global_batch": global_batch,
        "data": fingerprint_json([(e.sha256, e.caption, e.caption_long) for e in inputs.train]),
        "unet": fingerprint_module(components.unet)[:16],
        "vae": caches.latents.folder.name,
        "text_encoders": caches.encode.cache_id,
    }


def sample_spec(params: TrainParams) -> SampleSpec:
    buckets = make_buckets(
        params.resolution, params.bucket_step, params.min_bucket_reso, params.max_bucket_reso, params.max_aspect_ratio
    )
    size = nearest_bucket(*POSTER_ASPECT, buckets)
    return SampleSpec(
        params.samples.prompts,
        params.samples.negative_prompt,
        params.samples.seed,
        params.samples.steps,
        params.samples.guidance_scale,
        params.samples.guidance_rescale,
        size.width,
        size.height,
        params.max_token_length,
    )


def final_unet(accelerator: Accelerator, unet) -> UNet2DConditionModel:
    """The plain trained U-Net; under FSDP its shards are gathered (every process must call this)."""
    plain = accelerator.unwrap_model(unet)
    if accelerator.distributed_type != DistributedType.FSDP:
        return plain
    state = accelerator.get_state_dict(unet)
    gathered = UNet2DConditionModel.from_config(plain.config)
    if accelerator.is_main_process:
        gathered.load_state_dict(state)
    return gathered


def save_outputs(
    params: TrainParams,
    components: SDXLComponents,
    unet: UNet2DConditionModel,
    trained_encoders: dict[str, torch.nn.Module],
) -> None:
    """``models/unet`` (diffusers), the single-file checkpoint, ``models/text_encoders`` (the encoders
    that trained, if any) and ``models/base`` for sampling.

    Each file is written one tensor at a time. The single file's VAE and frozen text encoders
    are loaded again, in the save precision, from the base: what it carries is the base's own
    weights, whatever dtype training held them in.
    """
    out = params.output_dir
    save_unet(unet, out / "unet", params.save_precision, components.scheduler)
    frozen = pipeline_from_source(components.source, dtype=torch_dtype(params.save_precision), unet=unet)
    encoders = {name: trained_encoders.get(name, getattr(frozen, name)) for name in TEXT_ENCODERS}
    save_single_file(
        out / "sdxl-poster.safetensors",
        unet,
        frozen.vae,
        encoders["text_encoder"],
        encoders["text_encoder_2"],
        params.save_precision,
    )
    del frozen, encoders
    save_text_encoders(out / "text_encoders", trained_encoders, params.save_precision)
    save_base_folder(components.source, out / "base")
