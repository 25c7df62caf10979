"""The ``train:`` section of ``params.yaml``: every knob of the fine-tune, checked on load.

Names follow the guide and kohya-ss/sd-scripts (``mixed_precision``, ``save_precision``,
``keep_tokens``, ``shuffle_caption``, ``noise_offset``, ``optimizer_args``,
``lr_scheduler_args`` …). Everything that can be checked without a model, data or torch is
checked here, so a bad ``dvc exp run -S`` fails in well under a second with one line; the
optimizer's own arguments are tried on a stand-in weight when the run starts, before any
model loads (``optim.check_optimizer_args``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from postertune.models.ldm_keys import SDXL_UNET_BLOCKS
from postertune.models.sources import TINY
from postertune.params import Bounds, Colour, Invalid, MultipleOf, NotEmpty, ParamError, section

log = logging.getLogger(__name__)

OVERFIT_STEPS = 5000  # the guide (after EMU): fine-tunes past ~5k steps over-fit and lose generality

Optimizer = Literal["AdamW", "AdamW8bit", "Adafactor", "Prodigy"]
PRODIGY_RATES = (0.1, 10.0)  # Prodigy estimates its own step size; learning_rate only scales it, about 1.0
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


NonNegative = Bounds(ge=0)
AtLeastOne = Bounds(ge=1)
Fraction = Bounds(ge=0, le=1)
Timestep = Annotated[int, Bounds(ge=0, lt=1000)]


@dataclass(frozen=True)
class ValidationParams:
    """Loss on held-out images at fixed timesteps and noise: comparable across steps and runs."""

    split: Annotated[int | float, NonNegative] = 2  # an image count (int) or a fraction below 1 (float)
    every_n_steps: Annotated[int, NonNegative] = 10  # 0: never
    timesteps: list[Timestep] = field(default_factory=lambda: [100, 300, 500, 700, 900])

    def __post_init__(self) -> None:
        if isinstance(self.split, float) and self.split >= 1.0:
            raise Invalid("split", "a fraction must lie below 1 (or give an image count)")


@dataclass(frozen=True)
class SamplingParams:
    """Images rendered during training, logged beside the loss curves."""

    every_n_steps: Annotated[int, NonNegative] = 25  # 0: never
    prompts: list[str] = field(default_factory=lambda: ["movie poster, thriller, neon city at night, bold title"])
    negative_prompt: str = "worst quality, low quality, blurry, watermark"
    seed: int = 0
    steps: Annotated[int, AtLeastOne] = 4
    guidance_scale: Annotated[float, NonNegative] = 5.0
    guidance_rescale: Annotated[float, Fraction] = 0.0  # for v_prediction with zero terminal SNR, e.g. 0.7


@dataclass(frozen=True)
class CheckpointParams:
    every_n_steps: Annotated[int, NonNegative] = 25  # 0: only the final weights
    total_limit: Annotated[int, AtLeastOne] = 2
    resume: Literal["auto", "never"] = "auto"  # auto: continue from a checkpoint of the same recipe


@dataclass(frozen=True)
class TrainParams:
    # models
    base: str = "tiny"  # "tiny", a diffusers folder, a hub id, or a single-file .safetensors
    vae: str | None = None  # VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
    no_half_vae: bool = True  # keep the VAE in float32 under fp16/bf16 mixed precision
    # data
    captions: Path = Path("data/curated/images.parquet")  # the curate stage's table (all captioned when off)
    shards: Path = Path("data/raw/shards")
    cache_dir: Path = Path("models/cache")  # latents and text embeddings, reused across runs
    output_dir: Path = Path("models")  # base/, unet/, text_encoders/, sdxl-poster.safetensors, checkpoints/
    max_image_pixels: Annotated[int, AtLeastOne] = 50_000_000
    background: Colour = (255, 255, 255)  # transparent posters are composited onto this RGB colour
    # buckets and crops
    resolution: Annotated[int, AtLeastOne] = 128
    bucket_step: Annotated[int, Bounds(ge=8), MultipleOf(8)] = 32  # the VAE downscales by 8
    min_bucket_reso: Annotated[int, AtLeastOne] = 64
    max_bucket_reso: Annotated[int, AtLeastOne] = 256
    max_aspect_ratio: Annotated[float, Bounds(ge=1)] = 2.0
    random_crop: bool = False
    flip_aug: bool = False  # off by default: posters carry text
    # captions
    shuffle_caption: bool = True
    keep_tokens: Annotated[int, NonNegative] = 1
    caption_dropout_rate: Annotated[float, Fraction] = 0.1
    long_caption_ratio: Annotated[float, Fraction] = 0.5
    # captions past 75 tokens are encoded in 75-token chunks up to this length (kohya-ss, A1111)
    max_token_length: Literal[75, 150, 225] = 225
    # optimisation
    seed: int = 42
    batch_size: Annotated[int, AtLeastOne] = 4  # per process
    gradient_accumulation_steps: Annotated[int, AtLeastOne] = 1
    max_train_steps: Annotated[int, AtLeastOne] = 50
    learning_rate: Annotated[float, Bounds(gt=0)] | None = 5e-4
    optimizer: Optimizer = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=lambda: {"weight_decay": 0.01})
    lr_scheduler: LRScheduler = "constant_with_warmup"
    lr_warmup_steps: Annotated[int, NonNegative] = 5
    lr_scheduler_args: dict[str, Any] = field(default_factory=dict)
    max_grad_norm: Annotated[float, NonNegative] = 1.0
    fused_backward_pass: bool = False
    # parameter groups (kohya-ss): U-Net blocks at multiples of learning_rate, text encoders at rates of their own
    block_lr: Annotated[list[Annotated[float, NonNegative]], NotEmpty()] | None = None  # null: one rate; 0: frozen
    train_text_encoder: bool = False
    learning_rate_te1: Annotated[float, NonNegative] | None = None  # null: learning_rate; 0: encoder 1 frozen
    learning_rate_te2: Annotated[float, NonNegative] | None = None  # null: learning_rate; 0: encoder 2 frozen
    cache_text_encoder_outputs: bool | None = None  # null: when captions never change and the encoders are frozen
    # the recipe: noise, timesteps, loss and prediction (README "Train recipe knobs")
    noise_offset: Annotated[float, NonNegative] = 0.0357
    multires_noise_iterations: Annotated[int, NonNegative] = 0  # pyramid noise scales; 0: plain noise
    multires_noise_discount: Annotated[float, Bounds(gt=0, le=1)] = 0.3  # weight of scale i: discount**i
    input_perturbation: Annotated[float, NonNegative] = 0.0  # γ: noised with noise + γ·N(0, 1), target unchanged
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0  # logit_normal: t = sigmoid(N(logit_mean, logit_std)) over min…max_timestep
    logit_std: Annotated[float, Bounds(gt=0)] = 1.0
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: Annotated[float, Bounds(gt=0)] = 1.0  # probability factor of the biased steps
    timestep_bias_portion: Annotated[float, Bounds(gt=0, le=1)] = 0.25  # earlier/later: share of the range
    timestep_bias_begin: Timestep = 0  # range: the biased steps are begin … end - 1
    timestep_bias_end: Annotated[int, Bounds(ge=1, le=1000)] = 1000
    min_timestep: Timestep = 0  # every strategy draws from min_timestep … max_timestep - 1
    max_timestep: Annotated[int, Bounds(ge=1, le=1000)] = 1000
    snr_gamma: Annotated[float, Bounds(gt=0)] | None = 5.0  # null: no min-SNR weighting
    debiased_estimation_loss: bool = False  # weight 1/√SNR instead of min-SNR (snr_gamma: null)
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # huber_c over the timesteps
    huber_c: Annotated[float, Bounds(gt=0, le=1)] = 0.1
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False  # zero terminal SNR: the last step is pure noise (v_prediction only)
    # precision and speed
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    save_precision: Literal["float", "fp16", "bf16"] = "float"
    full_bf16: bool = False  # U-Net weights themselves in bf16 (lean mode)
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    channels_last: bool = False
    dataloader_num_workers: Annotated[int, NonNegative] = 0
    # EMA
    use_ema: bool = False
    ema_decay: Annotated[float, Bounds(gt=0, lt=1)] = 0.9999
    ema_device: Literal["cpu", "accelerator"] = "accelerator"
    # what a run logs, renders and keeps besides the weights
    validation: ValidationParams = field(default_factory=ValidationParams)
    samples: SamplingParams = field(default_factory=SamplingParams)
    checkpoints: CheckpointParams = field(default_factory=CheckpointParams)

    def __post_init__(self) -> None:
        self._check_buckets()
        self._check_optimizer()
        self._check_groups()
        self._check_scheduler()
        self._check_timesteps()
        self._check_loss()
        self._check_noise()
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise Invalid("full_bf16", "needs mixed_precision bf16")
        if self.max_train_steps > OVERFIT_STEPS:
            log.warning(
                "train.max_train_steps=%d is past %d: fine-tunes that long over-fit and lose generality (EMU)",
                self.max_train_steps,
                OVERFIT_STEPS,
            )

    def _check_buckets(self) -> None:
        for name in ("resolution", "min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) % self.bucket_step:
                raise Invalid(name, f"must be a multiple of bucket_step ({self.bucket_step})")
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise Invalid("resolution", "must lie within min_bucket_reso … max_bucket_reso")

    def _check_optimizer(self) -> None:
        if self.optimizer == "AdamW8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise Invalid("optimizer", "AdamW8bit needs the bitsandbytes package, which is not installed")
        if self.optimizer == "Adafactor":
            relative_step = self.optimizer_args.get("relative_step", True)
            if relative_step and self.learning_rate is not None:
                raise Invalid(
                    "learning_rate",
                    "must be null with Adafactor relative_step (it sets its own step size); "
                    "or set optimizer_args.relative_step: false",
                )
            if relative_step != (self.lr_scheduler == "adafactor"):
                raise Invalid("lr_scheduler", "Adafactor with relative_step goes with lr_scheduler adafactor only")
        elif self.lr_scheduler == "adafactor":
            raise Invalid("lr_scheduler", "adafactor is for the Adafactor optimizer with relative_step")
        if self.learning_rate is None and self.lr_scheduler != "adafactor":
            raise Invalid("learning_rate", "required unless Adafactor sets its own (relative_step)")
        if self.fused_backward_pass:
            if self.optimizer != "Adafactor":
                raise Invalid("fused_backward_pass", "needs optimizer Adafactor (-S train.fused_backward_pass=false)")
            if self.gradient_accumulation_steps != 1:
                raise Invalid("fused_backward_pass", "steps per parameter during backward: no gradient accumulation")
            if self.max_grad_norm:
                raise Invalid(
                    "max_grad_norm",
                    "must be 0 with fused_backward_pass (the whole gradient never exists at once; "
                    "Adafactor's clip_threshold bounds each update)",
                )
            if self.mixed_precision == "fp16":
                raise Invalid("fused_backward_pass", "does not work with fp16 loss scaling; use bf16")

    def _check_groups(self) -> None:
        if self.optimizer == "Prodigy" and self.learning_rate is not None:
            low, high = PRODIGY_RATES
            if not low <= self.learning_rate <= high:
                log.warning(
                    "train.learning_rate=%g with Prodigy: it scales Prodigy's own step-size estimate, "
                    "usually 1.0 (%g to %g); the estimate already adapts to the model",
                    self.learning_rate,
                    low,
                    high,
                )
        # Prodigy shares one step-size estimate between its groups: each trains at the one rate or not at all
        same_rate = "Prodigy takes one learning rate for every group"
        if self.block_lr is not None:
            if self.learning_rate is None:
                raise Invalid("block_lr", "multiplies train.learning_rate, which Adafactor's relative_step leaves null")
            if not any(self.block_lr):
                raise Invalid("block_lr", "every multiplier is 0: the U-Net would not train")
            if self.base == TINY and len(self.block_lr) != SDXL_UNET_BLOCKS:
                count = len(self.block_lr)
                raise Invalid("block_lr", f"needs {SDXL_UNET_BLOCKS} multipliers for the tiny U-Net, got {count}")
            if self.optimizer == "Prodigy" and set(self.block_lr) - {0, 1}:
                raise Invalid("block_lr", f"{same_rate}: multipliers 0 (frozen) or 1 only")
        for name in ("learning_rate_te1", "learning_rate_te2"):
            rate = getattr(self, name)
            if rate is None:
                continue
            if not self.train_text_encoder:
                raise Invalid(name, "is for train_text_encoder: true")
            if self.learning_rate is None and rate:
                raise Invalid(name, "Adafactor's relative_step sizes every step itself: null (or 0 to keep it frozen)")
            if self.optimizer == "Prodigy" and rate not in (0, self.learning_rate):
                raise Invalid(name, f"{same_rate}: null, 0 or train.learning_rate")
        if self.train_text_encoder and not self.text_encoder_rates:
            raise Invalid("train_text_encoder", "learning_rate_te1 and learning_rate_te2 are both 0: no encoder trains")
        if self.cache_text_encoder_outputs:
            if self.train_text_encoder:
                raise Invalid(
                    "cache_text_encoder_outputs",
                    "must not be true with train_text_encoder: trained encoders change their outputs at every step",
                )
            if self.augments_captions:
                raise Invalid(
                    "cache_text_encoder_outputs",
                    "must not be true while captions change between steps "
                    "(shuffle_caption, caption_dropout_rate, long_caption_ratio)",
                )

    def _check_scheduler(self) -> None:
        accepted = SCHEDULER_ARGS.get(self.lr_scheduler, set())
        for key in self.lr_scheduler_args:
            if key not in accepted:
                known = ", ".join(sorted(accepted)) or "none"
                raise Invalid(f"lr_scheduler_args.{key}", f"not used by {self.lr_scheduler} (it takes: {known})")
        if self.lr_scheduler == "piecewise_constant" and "step_rules" not in self.lr_scheduler_args:
            raise Invalid("lr_scheduler_args.step_rules", "required by piecewise_constant, e.g. '1:10,0.1'")
        if self.lr_warmup_steps and self.lr_scheduler in ("constant", "piecewise_constant", "adafactor"):
            raise Invalid("lr_warmup_steps", f"{self.lr_scheduler} does not warm up; use constant_with_warmup")

    def _check_timesteps(self) -> None:
        if self.min_timestep >= self.max_timestep:
            raise Invalid("max_timestep", f"must be above min_timestep ({self.min_timestep})")
        if self.timestep_sampling != "logit_normal":
            self._unused(("logit_mean", "logit_std"), "applies to timestep_sampling logit_normal only")
        strategy = self.timestep_bias_strategy
        if strategy == "none":
            self._unused(("timestep_bias_multiplier",), "applies with a timestep_bias_strategy only")
        elif self.timestep_bias_multiplier == 1.0:
            raise Invalid(
                "timestep_bias_multiplier", "1.0 changes nothing: above 1 favours the biased steps, below 1 avoids them"
            )
        if strategy not in ("earlier", "later"):
            self._unused(("timestep_bias_portion",), "applies to timestep_bias_strategy earlier or later only")
        if strategy != "range":
            self._unused(("timestep_bias_begin", "timestep_bias_end"), "applies to timestep_bias_strategy range only")
        else:
            allowed = (self.min_timestep, self.max_timestep)
            if not allowed[0] <= self.timestep_bias_begin < self.timestep_bias_end <= allowed[1]:
                raise Invalid(
                    "timestep_bias_begin",
                    f"begin … end must be a non-empty part of min_timestep … max_timestep ({allowed[0]} … {allowed[1]})",
                )
            if (self.timestep_bias_begin, self.timestep_bias_end) == allowed:
                raise Invalid("timestep_bias_begin", "begin … end covers every step drawn, which biases nothing")
        if strategy in ("earlier", "later") and self.timestep_bias_portion == 1.0:
            raise Invalid("timestep_bias_portion", "1 covers every step drawn, which biases nothing")

    def _check_loss(self) -> None:
        if self.debiased_estimation_loss and self.snr_gamma is not None:
            raise Invalid("debiased_estimation_loss", "replaces min-SNR weighting: set snr_gamma: null")
        if self.loss_type == "l2":
            self._unused(("huber_schedule", "huber_c"), "applies to loss_type huber or smooth_l1 only")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise Invalid(
                "rescale_betas_zero_snr",
                "needs prediction_type v_prediction (at zero SNR the noise says nothing about the image)",
            )

    def _check_noise(self) -> None:
        if not self.multires_noise_iterations:
            self._unused(("multires_noise_discount",), "applies with multires_noise_iterations above 0 only")

    def _unused(self, names: tuple[str, ...], why: str) -> None:
        """A knob set away from its default where the recipe ignores it is a mistake, not a no-op."""
        defaults = {f.name: f.default for f in fields(self)}
        for name in names:
            if getattr(self, name) != defaults[name]:
                raise Invalid(name, why)

    @property
    def augments_captions(self) -> bool:
        """Whether a caption can differ between steps (then text embeddings cannot be cached)."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or 0.0 < self.long_caption_ratio < 1.0

    @property
    def text_encoder_rates(self) -> dict[str, float | None]:
        """The learning rate of each text encoder that trains, by pipeline component name (kohya-ss:
        a null rate is ``learning_rate``, 0 keeps that encoder frozen)."""
        if not self.train_text_encoder:
            return {}
        rates = {"text_encoder": self.learning_rate_te1, "text_encoder_2": self.learning_rate_te2}
        return {name: self.learning_rate if rate is None else rate for name, rate in rates.items() if rate != 0}

    @property
    def caches_text(self) -> bool:
        """Whether caption encodings are computed once and cached, rather than at every step."""
        if self.cache_text_encoder_outputs is not None:
            return self.cache_text_encoder_outputs
        return not (self.augments_captions or self.train_text_encoder)

    def identity(self) -> dict[str, Any]:
        """The params that shape the trained weights: a checkpoint resumes only when these match.

        A longer ``max_train_steps`` resumes a finished run, unless the learning-rate
        schedule stretches with it.
        """
        values = asdict(self)
        for name in RUN_ONLY:
            values.pop(name)
        values["validation"] = {"split": self.validation.split}  # which images train; the rest only logs
        if self.lr_scheduler not in SCHEDULES_OVER_TOTAL_STEPS:
            values.pop("max_train_steps")
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


# Params that change what a run logs, samples or keeps, never the weights it trains
# (of ``validation``, only ``split`` shapes the weights: it decides which images train).
RUN_ONLY = (
    "captions",
    "shards",
    "output_dir",
    "cache_dir",
    "dataloader_num_workers",
    "samples",
    "checkpoints",
    "save_precision",
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
