"""``sample:`` params: which models render which prompts, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from postertune.devices import check_device, resolve_device
from postertune.models.precision import Precision
from postertune.params import ParamError
from postertune.sample.schedulers import SCHEDULERS

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class SampledModel:
    """One model to compare. ``base``: a saved base folder (``models/base``, full or pointer),
    a diffusers folder, a single-file ``.safetensors``, a hub id, or ``tiny``."""

    name: str
    base: str
    unet: Path | None = None  # a diffusers U-Net folder that replaces the base's U-Net
    single_file_config: str | None = None  # single file only: a diffusers folder or hub id with its configs


@dataclass(frozen=True)
class SampleParams:
    models: list[SampledModel]
    prompts: Path = Path("data/prompts/posters.csv")
    negative_presets: Path = Path("data/prompts/negative_presets.yaml")
    # empty: every prompt in the file
    prompt_ids: list[str] = field(
        default_factory=lambda: ["pet_bag", "skincare_essence", "space_thriller", "mecha_anime"]
    )
    negative: list[str] = field(default_factory=lambda: ["basic"])  # presets for rows that name none
    negative_text: str = ""  # free text appended to every negative prompt
    images_per_prompt: int = 2
    seed: int = 0  # image i of every prompt uses seed + i, for every model
    scheduler: str = "euler"
    steps: int = 4
    guidance_scale: float = 5.0
    width: int = 64
    height: int = 96
    precision: Precision = "float"
    device: str = "auto"
    grid_cell_width: int = 128
    output: Path = Path("data/samples")

    def __post_init__(self) -> None:
        if not self.models:
            raise ParamError("sample.models", "name at least one model")
        names = [m.name for m in self.models]
        for i, model in enumerate(self.models):
            if not MODEL_NAME.match(model.name):
                raise ParamError(
                    f"sample.models[{i}].name", f"{model.name!r} must be lower-case letters, digits, _ or -"
                )
            if model.name in names[:i]:
                raise ParamError(f"sample.models[{i}].name", f"{model.name!r} is used twice")
        if self.images_per_prompt < 1:
            raise ParamError("sample.images_per_prompt", "must be at least 1")
        if self.scheduler not in SCHEDULERS:
            raise ParamError("sample.scheduler", f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ParamError("sample.steps", "must be at least 1")
        if self.guidance_scale < 0:
            raise ParamError("sample.guidance_scale", "must not be negative")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value < 8 or value % 8:
                raise ParamError(f"sample.{key}", f"{value} must be a positive multiple of 8 (the VAE's downscale)")
        if self.grid_cell_width < 16:
            raise ParamError("sample.grid_cell_width", "must be at least 16")
        check_device("sample.device", self.device)

    @property
    def torch_device(self) -> str:
        return resolve_device("sample.device", self.device)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.images_per_prompt)]

    @property
    def settings(self) -> dict:
        """Everything besides model, prompt and seed that changes the pixels."""
        return dict(
            scheduler=self.scheduler,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            width=self.width,
            height=self.height,
            precision=self.precision,
        )
