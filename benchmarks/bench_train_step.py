"""One training step, timed: the train stage's ``training_step`` against the diffusers SDXL example's step.

    python benchmarks/bench_train_step.py --size sdxl --device cuda --budget-s 420   # the GPU sweep
    python benchmarks/bench_train_step.py --size tiny --device cpu                   # machinery only

Both steps train the same U-Net (same config, same seeded random weights, built from the
config on the device: nothing is downloaded) on batches of the same shape, at the same
resolution, under the same bf16 mixed precision, one process, in one run:

- ``postertune``: ``postertune.train.step.training_step`` driven the way ``train/loop.py``
  drives it: a pinned batch of cached latents, noise (with offset) and timesteps from the
  data loader, cached text embeddings; ``to_device``; the step (min-SNR loss, backward,
  update); the schedule's step. Three optimizer settings: Adafactor fused into the
  backward pass with float32 master weights (the sdxl profile), the same with the U-Net
  weights themselves in bf16 (``full_bf16``, the lean setting), and AdamW with gradient
  clipping (the base profile's optimizer).
- ``diffusers-example``: ``diffusers_example_step`` below, the loop body of diffusers'
  ``examples/text_to_image/train_text_to_image_sdxl.py`` rewritten line for line: AdamW
  (betas 0.9/0.999, weight decay 1e-2, eps 1e-8), clipping at 1.0, noise, offset and
  timesteps drawn on the device, time ids built per sample, its own min-SNR loss, the loss
  gathered and read back for logging. The example computes its VAE latents and text
  embeddings once before training (``datasets.map``), so its step, like ours, starts from
  latents; the batch arrives as its collate function leaves it (unpinned float32 tensors
  and lists of sizes and crops).

Each variant (step x gradient checkpointing x ``torch_compile`` x batch) builds a fresh
U-Net and optimizer, runs warm-up steps, then times ``--steps`` steps between two device
synchronisations. It reports images/s, model FLOPs utilisation, peak device memory, the
ratio to the diffusers step of the same checkpointing, compile and batch, and whether the
weights changed (a strided sample of every parameter tensor, before and after).

FLOPs per image are counted once with ``torch.utils.flop_counter.FlopCounterMode`` on the
exact U-Net config at the run's resolution, forward and backward at batch 1, on the meta
device (shapes only; attention counted as its two matmuls whatever kernel runs it), without
checkpointing: MFU credits model FLOPs, never the forward that checkpointing recomputes. The
real SDXL U-Net counts 20.23 TFLOP per 1024² image. Peak FLOP/s come from ``PEAK_BF16_TFLOPS``
(dense bf16) by device name, or ``--peak-tflops``; on a CPU there is none and MFU is null.

Variants run in ``PRIORITY`` order while the time budget lasts; one that would not finish
in the time left (estimated from what was measured so far), or that follows an out-of-memory
failure at a smaller batch, is kept in the JSON as ``skipped`` with the reason. Writes
``train_step.json`` and ``train_step.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import accelerate
import diffusers
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from postertune.models.sdxl_configs import SDXL_UNET  # noqa: E402
from postertune.models.tiny import (  # noqa: E402
    POOLED_WIDTH,
    SDXL_SCHEDULER_CONFIG,
    TEXT_WIDTH,
    TEXT_WIDTH_2,
    tiny_unet_config,
)
from postertune.train.loss import LossRecipe  # noqa: E402
from postertune.train.noise import NoiseRecipe, draw_noise  # noqa: E402
from postertune.train.optim import fuse_into_backward, optimizer_class  # noqa: E402
from postertune.train.step import StepConfig, to_device, training_step  # noqa: E402


# --- the train settings a step uses: read from the profiles, not restated ---------------------
# As the sdxl profile sets them (conf/profile/sdxl.yaml over conf/base.yaml); AdamW as the demo
# profile sets it. The learning rate is the one number changed, for both steps alike: the
# diffusers example's default 1e-4 instead of the profile's 4e-7, so that an update is large
# enough to move bf16 weights and "weights changed" tests the update machinery. Speed does not
# depend on it.
def profile_train_section(profile: str) -> dict:
    section = yaml.safe_load((ROOT / "conf/base.yaml").read_text())["train"]
    if profile != "demo":
        section.update(yaml.safe_load((ROOT / f"conf/profile/{profile}.yaml").read_text())["train"])
    return section


SDXL_TRAIN, DEMO_TRAIN = profile_train_section("sdxl"), profile_train_section("demo")
MIXED_PRECISION = SDXL_TRAIN["mixed_precision"]
LEARNING_RATE = 1e-4
SNR_GAMMA = SDXL_TRAIN["snr_gamma"]
NOISE_OFFSET = SDXL_TRAIN["noise_offset"]
ADAFACTOR_ARGS = SDXL_TRAIN["optimizer_args"]
ADAMW_ARGS = DEMO_TRAIN["optimizer_args"]  # with the demo's max_grad_norm 1.0
# The diffusers example's defaults: --adam_beta1/2, --adam_weight_decay, --adam_epsilon, --max_grad_norm.
EXAMPLE_ADAMW_ARGS = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
EXAMPLE_MAX_GRAD_NORM = 1.0
# ----------------------------------------------------------------------------------------------


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name contained in the device's wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
VAE_SCALE = 8  # pixels per latent side
PROMPT_TOKENS = 77
WEIGHT_SAMPLES = 4096  # values sampled per parameter tensor to tell whether it changed
BUDGET_MARGIN = 1.2  # a variant starts only if this times its estimate fits in the time left


@dataclass(frozen=True)
class Size:
    unet: dict
    context_width: int  # the two text encoders' hidden sizes together
    pooled_width: int
    resolution: int
    steps: int
    warmup: int
    # first guesses for the time budget, replaced by what the run measures
    setup_s: float
    s_per_image: float
    compile_s: float


SIZES = {
    "tiny": Size(tiny_unet_config(), TEXT_WIDTH + TEXT_WIDTH_2, POOLED_WIDTH, 64, 1, 1, 0.5, 0.5, 60.0),
    "sdxl": Size(SDXL_UNET, 2048, 1280, 1024, 5, 2, 10.0, 0.1, 150.0),
}


@dataclass(frozen=True)
class Method:
    name: str
    step: str  # "postertune" or "diffusers-example"
    optimizer: str
    fused_backward_pass: bool
    full_bf16: bool
    max_grad_norm: float


BASELINE = Method("diffusers-example", "diffusers-example", "AdamW", False, False, EXAMPLE_MAX_GRAD_NORM)
METHODS = (
    BASELINE,
    Method("adafactor-fused-fp32", "postertune", "Adafactor", True, False, 0.0),
    Method("adafactor-fused-bf16", "postertune", "Adafactor", True, True, 0.0),
    Method("adamw", "postertune", "AdamW", False, False, 1.0),
)
# (torch_compile, gradient_checkpointing, batch) in the order they run: the sdxl profile's
# setting first, then the throughput settings, the lean batch of 1, and compiled ones last
# (each compiles for minutes).
PRIORITY = (
    (False, True, 4),
    (False, False, 4),
    (False, True, 1),
    (False, False, 8),
    (False, True, 8),
    (False, False, 1),
    (True, False, 4),
    (True, True, 4),
    (True, False, 8),
    (True, True, 1),
    (True, True, 8),
    (True, False, 1),
)


@dataclass(frozen=True)
class Variant:
    method: Method
    torch_compile: bool
    gradient_checkpointing: bool
    batch: int

    @property
    def name(self) -> str:
        parts = [self.method.name, "ckpt" if self.gradient_checkpointing else "no-ckpt"]
        parts += ["compile" if self.torch_compile else "eager", f"b{self.batch}"]
        return "/".join(parts)

    @property
    def group(self) -> tuple[bool, bool, int]:
        return self.torch_compile, self.gradient_checkpointing, self.batch


# --- the diffusers example's step ---------------------------------------------------------------


def diffusers_example_step(
    batch: dict,
    unet,
    noise_scheduler,
    optimizer,
    lr_scheduler,
    accelerator: Accelerator,
    *,
    weight_dtype: torch.dtype,
    resolution: int,
    noise_offset: float,
    snr_gamma: float | None,
    max_grad_norm: float,
    train_batch_size: int,
) -> float:
    """One iteration of the training loop of diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py``
    (no timestep bias, no EMA, epsilon or v prediction), statement for statement; returns the logged loss."""
    with accelerator.accumulate(unet):
        model_input = batch["model_input"].to(accelerator.device)
        noise = torch.randn_like(model_input)
        if noise_offset:
            noise += noise_offset * torch.randn(
                (model_input.shape[0], model_input.shape[1], 1, 1), device=model_input.device
            )
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps).to(dtype=weight_dtype)

        def compute_time_ids(original_size, crops_coords_top_left):
            target_size = (resolution, resolution)
            add_time_ids = list(original_size + crops_coords_top_left + target_size)
            add_time_ids = torch.tensor([add_time_ids])
            return add_time_ids.to(accelerator.device, dtype=weight_dtype)

        add_time_ids = torch.cat(
            [compute_time_ids(s, c) for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)]
        )
        unet_added_conditions = {"time_ids": add_time_ids}
        prompt_embeds = batch["prompt_embeds"].to(accelerator.device, dtype=weight_dtype)
        pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(accelerator.device)
        unet_added_conditions.update({"text_embeds": pooled_prompt_embeds})
        model_pred = unet(
            noisy_model_input, timesteps, prompt_embeds, added_cond_kwargs=unet_added_conditions, return_dict=False
        )[0]

        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(model_input, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

        if snr_gamma is None:
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        else:
            snr = compute_snr(noise_scheduler, timesteps)
            mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            if noise_scheduler.config.prediction_type == "epsilon":
                mse_loss_weights = mse_loss_weights / snr
            elif noise_scheduler.config.prediction_type == "v_prediction":
                mse_loss_weights = mse_loss_weights / (snr + 1)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
            loss = loss.mean()

        avg_loss = accelerator.gather(loss.repeat(train_batch_size)).mean()
        train_loss = avg_loss.item()

        accelerator.backward(loss)
        if accelerator.sync_gradients:
            params_to_clip = unet.parameters()
            accelerator.clip_grad_norm_(params_to_clip, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return train_loss


def example_batch(size: Size, batch: int, generator: torch.Generator) -> dict:
    """A batch as the example's collate function returns it: precomputed latents and embeddings, sizes, crops."""
    side = size.resolution // VAE_SCALE
    return {
        "model_input": torch.randn((batch, 4, side, side), generator=generator),
        "prompt_embeds": torch.randn((batch, PROMPT_TOKENS, size.context_width), generator=generator),
        "pooled_prompt_embeds": torch.randn((batch, size.pooled_width), generator=generator),
        "original_sizes": [(size.resolution, size.resolution)] * batch,
        "crop_top_lefts": [(0, 0)] * batch,
    }


# --- the train stage's step -----------------------------------------------------------------------


def postertune_batch(size: Size, batch: int, generator: torch.Generator, pin: bool, num_timesteps: int) -> dict:
    """A batch as the train stage's data loader yields it (``train/data.py``): cached latent, noise with
    offset and timestep per sample, micro-conditioning, cached text embeddings; pinned on a GPU run."""
    side = size.resolution // VAE_SCALE
    r = float(size.resolution)
    out = {
        "latent": torch.randn((batch, 4, side, side), generator=generator),
        "noise": torch.stack([draw_noise((4, side, side), generator, NoiseRecipe(NOISE_OFFSET)) for _ in range(batch)]),
        "timestep": torch.randint(0, num_timesteps, (batch,), generator=generator),
        "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]] * batch),
        "prompt_embeds": torch.randn((batch, PROMPT_TOKENS, size.context_width), generator=generator),
        "pooled_prompt_embeds": torch.randn((batch, size.pooled_width), generator=generator),
    }
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def postertune_step(batch, unet, noise_scheduler, optimizer, lr_scheduler, accelerator, config, step) -> float:
    """The body of ``train/loop.py``'s step loop for one micro-batch (no accumulation)."""
    moved = to_device(batch, accelerator.device, config.channels_last)
    result = training_step(moved, unet, noise_scheduler, optimizer, accelerator, config, step)
    if not accelerator.optimizer_step_was_skipped:
        lr_scheduler.step()
    return result.loss


# --- FLOPs, peaks, weights --------------------------------------------------------------------------


def unet_inputs(size: Size, batch: int, dtype: torch.dtype = torch.float32) -> tuple:
    side = size.resolution // VAE_SCALE
    r = float(size.resolution)
    return (
        torch.randn((batch, 4, side, side), dtype=dtype),
        torch.randint(0, 1000, (batch,)),
        torch.randn((batch, PROMPT_TOKENS, size.context_width), dtype=dtype),
        {
            "text_embeds": torch.randn((batch, size.pooled_width), dtype=dtype),
            "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]] * batch, dtype=dtype),
        },
    )


def flops_per_image(size: Size) -> int:
    """Forward plus backward of one image through the U-Net, counted on the meta device, no checkpointing."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**size.unet)
        sample, timestep, context, added = unet_inputs(size, 1)
    with FlopCounterMode(display=False) as counter:
        prediction = unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)
        prediction[0].float().square().mean().backward()
    return counter.get_total_flops()


def peak_tflops(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    return name, next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def weight_sample(unet) -> tuple[torch.Tensor, list[int]]:
    """A strided sample of every parameter tensor, as one float32 CPU tensor, and each tensor's share."""
    pieces = []
    for p in unet.parameters():
        flat = p.detach().reshape(-1)
        count = min(flat.numel(), WEIGHT_SAMPLES)
        index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).long()
        pieces.append(flat[index].float())
    return torch.cat(pieces).cpu(), [len(piece) for piece in pieces]


def tensors_changed(before: torch.Tensor, after: torch.Tensor, lengths: list[int]) -> int:
    differs = before != after
    return sum(bool(chunk.any()) for chunk in torch.split(differs, lengths))


# --- one variant ----------------------------------------------------------------------------------


def build_unet(size: Size, method: Method, checkpointing: bool, device: torch.device, seed: int):
    """The same random weights for every variant: built from the config on the device, then placed
    the way each training script places its U-Net."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**size.unet)
    if method.step == "postertune":  # train/setup.py: component_dtypes, place_models
        unet.requires_grad_(True).train()
        if method.full_bf16:
            unet.to(dtype=torch.bfloat16)
        if checkpointing:
            unet.enable_gradient_checkpointing()
    else:  # the example: U-Net in float32, train mode, checkpointing by flag
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return unet


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: Variant, size: Size, device: torch.device, args) -> dict:
    """Build, warm up and time one variant; the numbers that do not need the others."""
    method = variant.method
    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=MIXED_PRECISION,
        cpu=device.type == "cpu",
        dynamo_backend="inductor" if variant.torch_compile else None,
        step_scheduler_with_optimizer=method.step != "postertune",
    )
    unet = build_unet(size, method, variant.gradient_checkpointing, device, args.seed)
    model = unet
    noise_scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    generator = torch.Generator().manual_seed(args.seed)
    hooks = []
    try:
        if method.step == "postertune":
            cls = optimizer_class(method.optimizer, method.fused_backward_pass)
            optimizer = cls(
                unet.parameters(),
                lr=LEARNING_RATE,
                **(ADAFACTOR_ARGS if method.optimizer == "Adafactor" else ADAMW_ARGS),
            )
            lr_scheduler = get_scheduler("constant", optimizer)
            if method.fused_backward_pass:
                hooks = fuse_into_backward(optimizer)
            unet, optimizer = accelerator.prepare(unet, optimizer)
            config = StepConfig(LossRecipe(SNR_GAMMA), method.max_grad_norm, method.fused_backward_pass)
            batches = [
                postertune_batch(
                    size, variant.batch, generator, device.type == "cuda", noise_scheduler.config.num_train_timesteps
                )
                for _ in range(2)
            ]

            def step(i: int) -> float:
                return postertune_step(
                    batches[i % 2], unet, noise_scheduler, optimizer, lr_scheduler, accelerator, config, i + 1
                )
        else:
            optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, **EXAMPLE_ADAMW_ARGS)
            lr_scheduler = get_scheduler("constant", optimizer=optimizer)
            unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
            batches = [example_batch(size, variant.batch, generator) for _ in range(2)]

            def step(i: int) -> float:
                return diffusers_example_step(
                    batches[i % 2],
                    unet,
                    noise_scheduler,
                    optimizer,
                    lr_scheduler,
                    accelerator,
                    weight_dtype=torch.bfloat16,
                    resolution=size.resolution,
                    noise_offset=NOISE_OFFSET,
                    snr_gamma=SNR_GAMMA,
                    max_grad_norm=method.max_grad_norm,
                    train_batch_size=variant.batch,
                )

        before, lengths = weight_sample(model)
        synchronize(device)
        setup_s = time.perf_counter() - started

        warmup = size.warmup + (1 if variant.torch_compile else 0)
        t0 = time.perf_counter()
        step(0)
        synchronize(device)
        first_step_s = time.perf_counter() - t0
        for i in range(1, warmup):
            step(i)
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + args.steps):
            loss = step(i)
        synchronize(device)
        timed_s = time.perf_counter() - t0

        after, _ = weight_sample(model)
        changed = tensors_changed(before, after, lengths)
        step_s = timed_s / args.steps
        return {
            "status": "measured",
            "images_per_s": variant.batch * args.steps / timed_s,
            "step_s": step_s,
            "first_step_s": first_step_s,
            "setup_s": setup_s,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "weights_changed": changed > 0,
            "tensors_changed": changed,
            "tensors": len(lengths),
            "loss": loss,
        }
    finally:
        for hook in hooks:
            hook.remove()
        accelerator.free_memory()


# --- the sweep --------------------------------------------------------------------------------------


class Budget:
    """What the variants measured so far say the next one will take."""

    def __init__(self, size: Size, seconds: float, args) -> None:
        self.size, self.seconds, self.args = size, seconds, args
        self.started = time.perf_counter()
        self.setup_s: list[float] = []
        self.steps: list[tuple[bool, int, float]] = []  # gradient checkpointing, batch, seconds per step
        self.compile_s: list[float] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def step_s(self, variant: Variant) -> float:
        """The slowest step measured at the largest batch so far with the same checkpointing, scaled up
        (never down) to this batch; a step costs less than in proportion to its batch."""
        same = [s for s in self.steps if s[0] == variant.gradient_checkpointing] or self.steps
        if not same:
            return self.size.s_per_image * variant.batch
        largest = max(batch for _, batch, _ in same)
        slowest = max(seconds for _, batch, seconds in same if batch == largest)
        return slowest * max(1.0, variant.batch / largest)

    def estimate(self, variant: Variant) -> float:
        setup = max(self.setup_s, default=self.size.setup_s)
        steps = self.size.warmup + self.args.steps + (1 if variant.torch_compile else 0)
        compile_s = max(self.compile_s, default=self.size.compile_s) if variant.torch_compile else 0.0
        return setup + steps * self.step_s(variant) + compile_s

    def record(self, variant: Variant, row: dict) -> None:
        self.setup_s.append(row["setup_s"])
        self.steps.append((variant.gradient_checkpointing, variant.batch, row["step_s"]))
        if variant.torch_compile:
            self.compile_s.append(max(0.0, row["first_step_s"] - row["step_s"]))


def describe(variant: Variant) -> dict:
    m = variant.method
    return {
        "name": variant.name,
        "step": m.step,
        "optimizer": m.optimizer,
        "fused_backward_pass": m.fused_backward_pass,
        "weights": "bf16" if m.full_bf16 else "float32",
        "max_grad_norm": m.max_grad_norm,
        "gradient_checkpointing": variant.gradient_checkpointing,
        "torch_compile": variant.torch_compile,
        "batch": variant.batch,
    }


def skip_reason(variant: Variant, device: torch.device, args, out_of_memory: dict, budget: Budget) -> str | None:
    if variant.batch not in args.batch_sizes:
        return "batch not requested (--batch-sizes)"
    if variant.torch_compile and device.type == "cpu" and not args.compile_on_cpu:
        return "torch_compile is measured on cuda only (inductor's CPU build takes minutes here; --compile-on-cpu)"
    key = (variant.method.name, variant.torch_compile, variant.gradient_checkpointing)
    if key in out_of_memory and out_of_memory[key] <= variant.batch:
        return f"out of memory already at batch {out_of_memory[key]}"
    needed, left = BUDGET_MARGIN * budget.estimate(variant), budget.left()
    if needed > left:
        return f"time budget: about {needed:.0f} s needed, {max(left, 0):.0f} s of --budget-s left"
    return None


def sweep(size: Size, device: torch.device, args, budget: Budget) -> list[dict]:
    rows = []
    out_of_memory: dict[tuple, int] = {}
    for group in PRIORITY:
        compile_, checkpointing, batch = group
        for method in METHODS:
            variant = Variant(method, compile_, checkpointing, batch)
            row = describe(variant)
            reason = skip_reason(variant, device, args, out_of_memory, budget)
            if reason is None:
                try:
                    row.update(measure(variant, size, device, args))
                    budget.record(variant, row)
                except Exception as exc:  # a failure is a result too; the sweep goes on
                    message = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                        key = (method.name, compile_, checkpointing)
                        out_of_memory[key] = min(batch, out_of_memory.get(key, batch))
                        reason = "out of memory"
                    else:
                        row.update({"status": "failed", "reason": message})
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if reason is not None:
                row.update({"status": "skipped", "reason": reason})
            rows.append(row)
            print(f"{row['name']}: {summary(row)}", file=sys.stderr, flush=True)
    return rows


def summary(row: dict) -> str:
    if row["status"] != "measured":
        return f"{row['status']}: {row['reason']}"
    return f"{row['images_per_s']:.3f} images/s, weights changed in {row['tensors_changed']}/{row['tensors']} tensors"


def add_ratios(rows: list[dict], flops: int, peak: float | None) -> None:
    baselines = {
        (r["torch_compile"], r["gradient_checkpointing"], r["batch"]): r["images_per_s"]
        for r in rows
        if r["step"] == "diffusers-example" and r["status"] == "measured"
    }
    for r in rows:
        if r["status"] != "measured":
            continue
        r["mfu"] = flops * r["images_per_s"] / (peak * 1e12) if peak else None
        base = baselines.get((r["torch_compile"], r["gradient_checkpointing"], r["batch"]))
        r["vs_diffusers"] = r["images_per_s"] / base if base else None


def targets(rows: list[dict], size_name: str, resolution: int, on_gpu: bool) -> dict:
    measured = [r for r in rows if r["status"] == "measured"]
    ours = [r for r in measured if r["step"] == "postertune"]
    theirs = [r for r in measured if r["step"] == "diffusers-example"]
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    best_theirs = max(theirs, key=lambda r: r["images_per_s"], default=None)
    lean = [r for r in ours if r["batch"] == 1 and r["peak_memory_mb"] is not None]
    leanest = min(lean, key=lambda r: r["peak_memory_mb"], default=None)
    real = on_gpu and size_name == "sdxl" and resolution == 1024
    return {
        "gpu_figures": real,
        "best_images_per_s": best and {"variant": best["name"], "images_per_s": best["images_per_s"]},
        "best_mfu": best and best.get("mfu"),
        "mfu_target": 0.45,
        "best_vs_best_diffusers": (
            best["images_per_s"] / best_theirs["images_per_s"] if best and best_theirs else None
        ),
        "speed_target": 1.3,
        "leanest_batch1": leanest and {"variant": leanest["name"], "peak_memory_mb": leanest["peak_memory_mb"]},
        "memory_target_mb": 12 * 1024,
    }


def flop_text(flops: int) -> str:
    return f"{flops / 1e12:.4g} TFLOP" if flops >= 1e11 else f"{flops / 1e9:.4g} GFLOP"


def fmt(value, pattern: str, missing: str = "–") -> str:
    return missing if value is None else pattern.format(value)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Training step: postertune against the diffusers SDXL example ({result['size']}, {env['device_name']})",
        "",
        f"- command: `{result['command']}`",
        f"- device: {env['device']} ({env['device_name']}); torch {env['torch']}, diffusers {env['diffusers']}, "
        f"accelerate {env['accelerate']}",
        f"- U-Net: {result['unet_parameters']:,} parameters, {result['resolution']}² images, "
        f"{MIXED_PRECISION} mixed precision, {result['warmup_steps']} warm-up + {result['timed_steps']} timed steps",
        f"- FLOPs per image (forward + backward, no recompute): {flop_text(result['flops_per_image'])}; "
        f"peak: {fmt(result['peak_tflops'], '{:g} TFLOP/s bf16 dense', 'none known (MFU not computed)')}",
        f"- {result['elapsed_s']:.0f} s of a {result['budget_s']:.0f} s budget",
    ]
    if not result["targets"]["gpu_figures"]:
        lines.append("- **not GPU figures**: machinery check only; these speeds say nothing about a GPU")
    lines += [
        "",
        "| step | optimizer | weights | ckpt | compile | batch | images/s | MFU | peak GB | vs diffusers | "
        "weights changed | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["variants"]:
        optimizer = r["optimizer"] + (" fused" if r["fused_backward_pass"] else "")
        head = (
            f"| {r['step']} | {optimizer} | {r['weights']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
            f"{'on' if r['torch_compile'] else 'off'} | {r['batch']} |"
        )
        if r["status"] == "measured":
            peak_gb = None if r["peak_memory_mb"] is None else r["peak_memory_mb"] / 1024
            lines.append(
                f"{head} {r['images_per_s']:.3g} | {fmt(r.get('mfu'), '{:.1%}')} | {fmt(peak_gb, '{:.1f}')} | "
                f"{fmt(r.get('vs_diffusers'), '{:.2f}x')} | {r['tensors_changed']}/{r['tensors']} | |"
            )
        else:
            lines.append(f"{head} | | | | | {r['status']}: {r['reason']} |")
    t = result["targets"]
    lines += [
        "",
        f"- best: {fmt(t['best_images_per_s'] and t['best_images_per_s']['variant'], '{}')} "
        f"at {fmt(t['best_images_per_s'] and t['best_images_per_s']['images_per_s'], '{:.3g}')} images/s, "
        f"MFU {fmt(t['best_mfu'], '{:.1%}')} (target ≥ 45 % on an H100 at 1024²)",
        f"- best postertune step against the best diffusers step: {fmt(t['best_vs_best_diffusers'], '{:.2f}x')} "
        "(target ≥ 1.3x)",
        f"- leanest batch-1 setting: {fmt(t['leanest_batch1'] and t['leanest_batch1']['variant'], '{}')}, "
        f"{fmt(t['leanest_batch1'] and t['leanest_batch1']['peak_memory_mb'] / 1024, '{:.1f} GB')} "
        "(target ≤ 12 GB at 1024²)",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting variants after this")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: 1024 sdxl, 64 tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 5 sdxl, 1 tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s, if not in the table")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also run the torch_compile variants on a CPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    size = SIZES[args.size]
    if args.resolution:
        size = Size(**{**size.__dict__, "resolution": args.resolution})
    args.steps = args.steps or size.steps
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    budget = Budget(size, args.budget_s, args)

    flops = flops_per_image(size)
    device_name, peak = peak_tflops(device, args.peak_tflops)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UNet2DConditionModel(**size.unet).parameters())
    rows = sweep(size, device, args, budget)
    add_ratios(rows, flops, peak)
    result = {
        "command": " ".join(
            ["python", "benchmarks/bench_train_step.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "size": args.size,
        "resolution": size.resolution,
        "unet_parameters": parameters,
        "mixed_precision": MIXED_PRECISION,
        "warmup_steps": size.warmup,
        "timed_steps": args.steps,
        "flops_per_image": flops,
        "flops_counted": "FlopCounterMode, forward + backward at batch 1, meta device, no checkpoint recompute",
        "peak_tflops": peak,
        "budget_s": args.budget_s,
        "elapsed_s": time.perf_counter() - budget.started,
        "settings": {
            "learning_rate": LEARNING_RATE,
            "snr_gamma": SNR_GAMMA,
            "noise_offset": NOISE_OFFSET,
            "adafactor_args": ADAFACTOR_ARGS,
            "adamw_args": ADAMW_ARGS,
            "example_adamw_args": {**EXAMPLE_ADAMW_ARGS, "betas": list(EXAMPLE_ADAMW_ARGS["betas"])},
        },
        "environment": {
            "device": device.type,
            "device_name": device_name,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "variants": rows,
    }
    result["targets"] = targets(rows, args.size, size.resolution, device.type == "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "train_step.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
