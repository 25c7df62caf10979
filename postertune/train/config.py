"""The ``train:`` section of ``params.yaml``: every knob of the fine-tune, checked on load.

Names follow the guide and kohya-ss/sd-scripts (``mixed_precision``, ``save_precision``,
``keep_tokens``, ``shuffle_caption``, ``noise_offset``, ``optimizer_args``,
``lr_scheduler_args`` …). Everything that can be checked without a model or data is
checked here, so a bad ``dvc exp run -S`` fails in a second with one line.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from postertune.params import ParamError, section

log = logging.getLogger(__name__)

OVERFIT_STEPS = 5000  # the guide (after EMU): fine-tunes past ~5k steps over-fit and lose generality

Optimizer = Literal["AdamW", "AdamW8bit", "Adafactor"]
LRScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
    "adafactor",
]
# lr_scheduler_args each scheduler of diffusers' get_scheduler understands
SCHEDULER_ARGS: dict[str, set[str]] = {
    "cosine": {"num_cycles"},
    "cosine_with_restarts": {"num_cycles"},
    "polynomial": {"power"},
    "piecewise_constant": {"step_rules"},
}


@dataclass(frozen=True)
class TrainParams:
    # models
    base: str = "tiny"  # "tiny", a diffusers folder, a hub id, or a single-file .safetensors
    vae: str | None = None  # VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
    no_half_vae: bool = True  # keep the VAE in float32 under fp16/bf16 mixed precision
    # data
    captions: Path = Path("data/captions/captions.parquet")
    shards: Path = Path("data/raw/shards")
    cache_dir: Path = Path("models/cache")
    output_dir: Path = Path("models")
    max_image_pixels: int = 50_000_000
    # buckets and crops
    resolution: int = 1024
    bucket_step: int = 64
    min_bucket_reso: int = 512
    max_bucket_reso: int = 2048
    max_aspect_ratio: float = 2.0
    random_crop: bool = False
    flip_aug: bool = False  # off by default: posters carry text
    # captions
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    long_caption_ratio: float = 0.0
    # optimisation
    seed: int = 42
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    learning_rate: float | None = 1e-5
    optimizer: Optimizer = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: LRScheduler = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_args: dict[str, Any] = field(default_factory=dict)
    max_grad_norm: float = 1.0
    fused_backward_pass: bool = False
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    # precision and speed
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    full_bf16: bool = False  # U-Net weights themselves in bf16 (lean mode)
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    channels_last: bool = False
    dataloader_num_workers: int = 0
    # EMA
    use_ema: bool = False
    ema_decay: float = 0.9999
    ema_device: Literal["cpu", "accelerator"] = "accelerator"
    # validation loss on held-out images
    validation_split: int | float = 0  # an image count (int) or a fraction below 1 (float)
    validation_every_n_steps: int = 0
    validation_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    # samples during training
    sample_every_n_steps: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_seed: int = 0
    sample_steps: int = 30
    sample_guidance_scale: float = 7.0
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume: Literal["auto", "never"] = "auto"

    def __post_init__(self) -> None:
        self._check_positive()
        self._check_buckets()
        self._check_captions()
        self._check_optimizer()
        self._check_scheduler()
        self._dry_run_optimizer()
        self._check_precision()
        self._check_validation()
        if self.max_train_steps > OVERFIT_STEPS:
            log.warning(
                "train.max_train_steps=%d is past %d: fine-tunes that long over-fit and lose generality (EMU)",
                self.max_train_steps,
                OVERFIT_STEPS,
            )

    def _check_positive(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpoints_total_limit"):
            if getattr(self, name) < 1:
                raise ParamError(f"train.{name}", "must be at least 1")
        for name in (
            "lr_warmup_steps",
            "dataloader_num_workers",
            "validation_every_n_steps",
            "sample_every_n_steps",
            "checkpointing_steps",
            "max_grad_norm",
            "noise_offset",
        ):
            if getattr(self, name) < 0:
                raise ParamError(f"train.{name}", "must not be negative")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ParamError("train.snr_gamma", "must be positive (or null to turn min-SNR weighting off)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ParamError("train.ema_decay", "must lie strictly between 0 and 1")
        if self.sample_steps < 1:
            raise ParamError("train.sample_steps", "must be at least 1")

    def _check_buckets(self) -> None:
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise ParamError("train.bucket_step", "must be a positive multiple of 8 (the VAE downscale)")
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) % self.bucket_step:
                raise ParamError(f"train.{name}", f"must be a multiple of train.bucket_step ({self.bucket_step})")
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ParamError("train.resolution", "must lie within train.min_bucket_reso … train.max_bucket_reso")
        if self.max_aspect_ratio < 1.0:
            raise ParamError("train.max_aspect_ratio", "must be at least 1")

    def _check_captions(self) -> None:
        if self.keep_tokens < 0:
            raise ParamError("train.keep_tokens", f"must not be negative, got {self.keep_tokens}")
        for name in ("caption_dropout_rate", "long_caption_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamError(f"train.{name}", "must lie within 0 … 1")

    def _check_optimizer(self) -> None:
        if self.optimizer == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ParamError("train.optimizer", "AdamW8bit needs the bitsandbytes package, which is not installed")
        if self.optimizer == "Adafactor":
            relative_step = self.optimizer_args.get("relative_step", True)
            if relative_step and self.learning_rate is not None:
                raise ParamError(
                    "train.learning_rate",
                    "must be null with Adafactor relative_step (it sets its own step size); "
                    "or set train.optimizer_args.relative_step: false",
                )
            if relative_step != (self.lr_scheduler == "adafactor"):
                raise ParamError(
                    "train.lr_scheduler", "Adafactor with relative_step goes with lr_scheduler adafactor only"
                )
        elif self.lr_scheduler == "adafactor":
            raise ParamError("train.lr_scheduler", "adafactor is for the Adafactor optimizer with relative_step")
        if self.learning_rate is None and self.lr_scheduler != "adafactor":
            raise ParamError("train.learning_rate", "required unless Adafactor sets its own (relative_step)")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ParamError("train.learning_rate", "must be positive")
        if self.fused_backward_pass:
            if self.optimizer != "Adafactor":
                raise ParamError("train.fused_backward_pass", "needs optimizer Adafactor")
            if self.gradient_accumulation_steps != 1:
                raise ParamError(
                    "train.fused_backward_pass", "steps per parameter during backward: no gradient accumulation"
                )
            if self.max_grad_norm:
                raise ParamError(
                    "train.max_grad_norm",
                    "must be 0 with fused_backward_pass (the whole gradient never exists at once; "
                    "Adafactor's clip_threshold bounds each update)",
                )
            if self.mixed_precision == "fp16":
                raise ParamError("train.fused_backward_pass", "does not work with fp16 loss scaling; use bf16")

    def _check_scheduler(self) -> None:
        accepted = SCHEDULER_ARGS.get(self.lr_scheduler, set())
        for key in self.lr_scheduler_args:
            if key not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                raise ParamError(
                    f"train.lr_scheduler_args.{key}", f"not used by {self.lr_scheduler} (it takes: {known})"
                )
        if self.lr_scheduler == "piecewise_constant" and "step_rules" not in self.lr_scheduler_args:
            raise ParamError("train.lr_scheduler_args.step_rules", "required by piecewise_constant, e.g. '1:10,0.1'")
        if self.lr_warmup_steps and self.lr_scheduler in ("constant", "piecewise_constant", "adafactor"):
            raise ParamError("train.lr_warmup_steps", f"{self.lr_scheduler} does not warm up; use constant_with_warmup")

    def _dry_run_optimizer(self) -> None:
        """Build the optimizer and schedule on a stand-in parameter, so bad names and values fail now."""
        if self.optimizer == "AdamW8bit":
            return  # bitsandbytes checks its arguments on the device it runs on
        import torch

        from postertune.train.optim import make_lr_scheduler, make_optimizer, optimizer_class

        accepted = inspect.signature(optimizer_class(self.optimizer).__init__).parameters
        for key in self.optimizer_args:
            if key not in accepted or key in ("self", "params", "lr"):
                raise ParamError(f"train.optimizer_args.{key}", f"not an argument of {self.optimizer}")

        # Whatever a constructor raises on these stand-in weights, the args alone are to blame.
        try:
            optimizer = make_optimizer(self, [torch.nn.Parameter(torch.zeros(2, 2))])
        except Exception as exc:
            raise ParamError("train.optimizer_args", f"{self.optimizer} rejects them: {exc}") from None
        try:
            make_lr_scheduler(self, optimizer)
        except Exception as exc:
            raise ParamError("train.lr_scheduler_args", f"{self.lr_scheduler} rejects them: {exc}") from None

    def _check_precision(self) -> None:
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ParamError("train.full_bf16", "needs mixed_precision bf16")

    def _check_validation(self) -> None:
        split = self.validation_split
        if isinstance(split, float) and not 0.0 <= split < 1.0:
            raise ParamError("train.validation_split", "a fraction must lie within 0 … 1 (or give an image count)")
        if split < 0:
            raise ParamError("train.validation_split", "must not be negative")
        for t in self.validation_timesteps:
            if not 0 <= t < 1000:
                raise ParamError("train.validation_timesteps", f"{t} is outside 0 … 999")

    @property
    def augments_captions(self) -> bool:
        """Whether a caption can differ between steps (then text embeddings cannot be cached)."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or 0.0 < self.long_caption_ratio < 1.0

    def identity(self) -> dict[str, Any]:
        """The params that shape the trained weights: a checkpoint resumes only when these match.

        A longer ``max_train_steps`` resumes a finished run, unless the learning-rate
        schedule stretches with it.
        """
        values = asdict(self)
        for name in RUN_ONLY:
            values.pop(name)
        if self.lr_scheduler not in SCHEDULES_OVER_TOTAL_STEPS:
            values.pop("max_train_steps")
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


# Params that change what a run logs, samples or keeps, never the weights it trains.
RUN_ONLY = (
    "output_dir",
    "cache_dir",
    "dataloader_num_workers",
    "validation_every_n_steps",
    "sample_every_n_steps",
    "sample_prompts",
    "sample_negative_prompt",
    "sample_seed",
    "sample_steps",
    "sample_guidance_scale",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume",
    "save_precision",
    "validation_timesteps",
    "ema_device",
    "gradient_checkpointing",
    "torch_compile",
)
SCHEDULES_OVER_TOTAL_STEPS = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def load_train_params(path: Path = Path("params.yaml")) -> TrainParams:
    return section(TrainParams, "train", path)


def check_runtime(params: TrainParams, accelerator_available: bool) -> None:
    """Checks that depend on the machine, not the params alone: run before any model loads."""
    if not accelerator_available and params.mixed_precision == "fp16":
        raise ParamError("train.mixed_precision", "fp16 needs a GPU; this run is CPU-only (use no or bf16)")
