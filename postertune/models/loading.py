"""Load SDXL for training and sampling; save the base and the fine-tuned U-Net for later stages.

The train stage loads its components with ``load_components`` and writes two folders:

- ``models/unet/`` (``save_unet``): the fine-tuned U-Net, diffusers format, safetensors, with
  the sampler config of the noise schedule it was trained for (``models/schedule.py``).
- ``models/base/`` (``save_base_folder``): the base the U-Net belongs with. For the tiny
  demo model it is a full diffusers folder (a few MB). For real weights, which already sit
  in the hub cache or in a local file, it is a pointer, ``base.json``, naming the
  ``ModelSource`` (base, VAE override, single-file config): copying 7 GB on every run would
  be waste. Relative paths in it are relative to the repository root, where stages run.

Sample and evaluate then call ``load_pipeline("models/base", "models/unet")``, which reads
either form, and samples with the U-Net's own schedule; a full folder also loads with plain
``StableDiffusionXLPipeline.from_pretrained("models/base", unet=...)``.

Only safetensors weights are loaded. Nothing here downloads unless the environment allows
the hub; offline, hub ids resolve from the local cache or fail with a one-line error.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from postertune.atomic import atomic_dir, write_json
from postertune.errors import PipelineError
from postertune.models.precision import Precision
from postertune.models.safetensors_writer import cast_when_written, write_safetensors
from postertune.models.schedule import use_unet_schedule
from postertune.models.sources import TINY, ModelSource, SourceKind, source_kind
from postertune.models.tiny import build_tiny_pipeline
from postertune.params import build

POINTER_FILE = "base.json"
# What diffusers raises on a source it cannot use: absent from the cache, wrong or corrupt files.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


# A dtype for every component, or one per component name ("unet", "vae", "text_encoder",
# "text_encoder_2") with a "default" for the rest, as diffusers' ``from_pretrained`` takes it.
Dtypes = torch.dtype | dict[str, torch.dtype]
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


def dtype_of(dtype: Dtypes, component: str) -> torch.dtype:
    if isinstance(dtype, dict):
        return dtype.get(component, dtype.get("default", torch.float32))
    return dtype


@dataclass
class SDXLComponents:
    """The parts of an SDXL base model that training uses, plus where they came from.

    Training drops the VAE and text encoders (``None``) once nothing later in the run uses them.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # for training: made from the base's scheduler config
    scheduler: SchedulerMixin  # the base's own inference scheduler
    source: ModelSource

    def pipeline(self, unet: UNet2DConditionModel | None = None) -> StableDiffusionXLPipeline:
        """An inference pipeline sharing these modules (sample images during training)."""
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet if unet is not None else self.unet,
            scheduler=self.scheduler,
        )


def load_components(
    base: str,
    vae: str | None = None,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    single_file_config: str | None = None,
    dtype: Dtypes = torch.float32,
) -> SDXLComponents:
    """Load every SDXL component from ``base``, with the VAE from ``vae`` if given, each in its ``dtype``.

    ``base``: ``"tiny"`` (built from ``seed``), a diffusers folder, a hub id such as
    ``stabilityai/stable-diffusion-xl-base-1.0``, or a single-file ``.safetensors`` in the
    original layout. A single file carries weights only: its configs, tokenizers and
    scheduler come from ``single_file_config`` (a diffusers folder or hub id; offline it
    must be a local folder or cached) or, when that is ``None``, from the SDXL base repo.
    ``vae``: a diffusers VAE folder, a hub id such as ``madebyollin/sdxl-vae-fp16-fix``, or
    a single-file VAE ``.safetensors`` (which takes the base VAE's architecture config).
    """
    source = ModelSource(base=base, vae=vae, single_file_config=single_file_config, seed=seed)
    pipe = pipeline_from_source(source, dtype=dtype, cache_dir=cache_dir)
    return SDXLComponents(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        scheduler=pipe.scheduler,
        source=source,
    )


def load_pipeline(
    base_dir_or_source: Path | str,
    unet_dir: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: Path | None = None,
) -> StableDiffusionXLPipeline:
    """The inference pipeline of a saved base (full folder or ``base.json`` pointer) or of a
    source as ``load_components`` takes it, with the U-Net from ``unet_dir`` if given (and
    the noise schedule saved with it)."""
    pointer = Path(base_dir_or_source) / POINTER_FILE
    source = read_pointer(pointer) if pointer.is_file() else ModelSource(base=str(base_dir_or_source))
    if unet_dir is None:
        return pipeline_from_source(source, dtype=dtype, cache_dir=cache_dir)
    pipe = pipeline_from_source(source, dtype=dtype, unet=load_unet(unet_dir, dtype), cache_dir=cache_dir)
    use_unet_schedule(pipe, unet_dir)
    return pipe


def pipeline_from_source(
    source: ModelSource,
    *,
    dtype: Dtypes = torch.float32,
    unet: UNet2DConditionModel | None = None,
    cache_dir: Path | None = None,
) -> StableDiffusionXLPipeline:
    """Load ``source`` as a pipeline, each component in its ``dtype``; a given ``unet`` replaces the
    base's without loading it (and keeps its own dtype)."""
    kind = _check_source(source)
    given = {"unet": unet} if unet is not None else {}
    try:
        if kind == "tiny":
            pipe = _tiny_pipeline(source.seed)  # built in float32, then cast: a few MB
            pipe.register_modules(**given)
        elif kind == "file":
            pipe = _single_file_pipeline(source, dtype, given, cache_dir)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                source.base, dtype=dtype, cache_dir=cache_dir, use_safetensors=True, **given
            )
    except LOAD_ERRORS as exc:
        raise PipelineError(f"base model {source.base}: cannot load: {_first_line(exc)}") from None
    _cast_loaded(pipe, dtype, given)
    if source.vae is not None:
        pipe.register_modules(vae=load_vae(source.vae, pipe.vae, source.seed, dtype_of(dtype, "vae"), cache_dir))
    return pipe


def _single_file_pipeline(
    source: ModelSource, dtype: Dtypes, given: dict, cache_dir: Path | None
) -> StableDiffusionXLPipeline:
    """A single file holds every component: load them all at the widest dtype any of them needs
    (casting down later is exact), except a U-Net whose dtype differs, loaded on its own."""
    widest = max((dtype_of(dtype, name) for name in WEIGHTED if name != "unet"), key=lambda d: d.itemsize)
    if "unet" not in given and dtype_of(dtype, "unet") != widest:
        given = {
            "unet": UNet2DConditionModel.from_single_file(
                source.base,
                config=source.single_file_config,
                subfolder="unet",
                dtype=dtype_of(dtype, "unet"),
                cache_dir=cache_dir,
            )
        }
    return StableDiffusionXLPipeline.from_single_file(
        source.base, config=source.single_file_config, dtype=widest, cache_dir=cache_dir, **given
    )


def _cast_loaded(pipe: StableDiffusionXLPipeline, dtype: Dtypes, given: dict) -> None:
    """Components the loader built in another dtype than asked (tiny, single file) are cast."""
    for name in WEIGHTED:
        module = getattr(pipe, name)
        if name not in given and module.dtype != dtype_of(dtype, name):
            module.to(dtype=dtype_of(dtype, name))


def load_vae(
    value: str, base_vae: AutoencoderKL, seed: int, dtype: torch.dtype, cache_dir: Path | None
) -> AutoencoderKL:
    """The VAE named by ``value``; a single file takes ``base_vae``'s architecture config."""
    kind = source_kind("vae", value)
    try:
        if kind == "tiny":
            return _tiny_pipeline(seed).vae.to(dtype)
        if kind == "file":
            with tempfile.TemporaryDirectory() as config_dir:
                base_vae.save_config(config_dir)
                return AutoencoderKL.from_single_file(value, config=config_dir, dtype=dtype)
        subfolder = None
        if kind == "folder":
            if (Path(value) / "model_index.json").is_file():
                subfolder = "vae"  # a whole pipeline folder: take its VAE
            else:
                _require_file(Path(value) / "config.json", "vae")
        return AutoencoderKL.from_pretrained(
            value, subfolder=subfolder, dtype=dtype, cache_dir=cache_dir, use_safetensors=True
        )
    except LOAD_ERRORS as exc:
        raise PipelineError(f"vae {value}: cannot load: {_first_line(exc)}") from None


def load_unet(unet_dir: Path | str, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A U-Net folder as ``save_unet`` writes it."""
    _require_file(Path(unet_dir) / "config.json", "unet")
    try:
        return UNet2DConditionModel.from_pretrained(unet_dir, dtype=dtype, use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise PipelineError(f"unet {unet_dir}: cannot load: {_first_line(exc)}") from None


def save_unet(
    unet: UNet2DConditionModel, folder: Path | str, precision: Precision, schedule: SchedulerMixin | None = None
) -> Path:
    """Write ``unet`` as a diffusers folder (config + safetensors) in ``precision``, atomically,
    one tensor at a time (no second copy of the weights); with ``schedule``, also the sampler
    config it is to be sampled with (``scheduler_config.json``).

    The model itself is not cast. Pass the plain model, not one wrapped for distributed
    training or compiled.
    """
    with atomic_dir(folder) as tmp:
        unet.save_config(tmp)
        if schedule is not None:
            schedule.save_config(tmp)
        write_safetensors(tmp / UNET_WEIGHTS, cast_when_written(unet.state_dict(), precision), {"format": "pt"})
    return Path(folder)


def save_base_folder(source: ModelSource, folder: Path | str, *, cache_dir: Path | None = None) -> Path:
    """Write ``models/base``: the full tiny model, or a ``base.json`` pointer for real weights.

    The tiny model is rebuilt from its seed, so this may be called at any time during
    training without picking up trained weights.
    """
    with atomic_dir(folder) as tmp:
        if source.base == TINY:
            pipeline_from_source(source, cache_dir=cache_dir).save_pretrained(tmp, safe_serialization=True)
        else:
            write_json(tmp / POINTER_FILE, asdict(source))
    return Path(folder)


def read_pointer(path: Path) -> ModelSource:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    return build(ModelSource, data, str(path))


def _tiny_pipeline(seed: int) -> StableDiffusionXLPipeline:
    return build_tiny_pipeline(seed)


def _check_source(source: ModelSource) -> SourceKind:
    """Check every part of ``source`` before loading any of it; the base's kind."""
    kind = source_kind("base model", source.base)
    if kind == "folder":
        _require_file(Path(source.base) / "model_index.json", "base model")
    if source.vae is not None:
        source_kind("vae", source.vae)
    config = source.single_file_config
    if kind == "file" and config is not None:
        config_kind = source_kind("single_file_config", config)
        if config_kind == "folder":
            _require_file(Path(config) / "model_index.json", "single_file_config")
        elif config_kind != "hub":
            raise PipelineError(f"single_file_config {config}: expected a diffusers folder or hub id")
    return kind


def _require_file(path: Path, label: str) -> None:
    if not path.parent.is_dir():
        raise PipelineError(f"{label} {path.parent}: no such folder")
    if not path.is_file():
        raise PipelineError(f"{label} {path.parent}: not a diffusers folder (no {path.name})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
