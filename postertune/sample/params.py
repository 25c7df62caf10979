"""``sample:`` params: which models render which prompts, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from postertune.devices import check_device, resolve_device
from postertune.params import Bounds, Invalid, MultipleOf, NotEmpty, Precision

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# the samplers of sample/schedulers.py, by the names the SD UIs use
SchedulerName = Literal["euler", "euler_a", "heun", "lms", "ddim", "dpm++2m", "dpm++2m_karras", "dpm++2m_sde", "unipc"]


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA file (kohya or diffusers/PEFT layout) merged into the model's U-Net with ``weight``."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class SampledModel:
    """One model to compare. ``base``: a saved base folder (``models/base``, full or pointer),
    a diffusers folder, a single-file ``.safetensors``, a hub id, or ``tiny``.

    ``base + lora:<file>`` is ``{base: models/base, loras: [{path: <file>}]}``;
    ``finetuned + lora:<file>@<weight>`` adds ``unet: models/unet`` and ``weight: <weight>``."""

    name: str
    base: str
    unet: Path | None = None  # a diffusers U-Net folder that replaces the base's U-Net
    text_encoders: Path | None = None  # trained encoders as train writes them: each one there replaces the base's
    single_file_config: str | None = None  # single file only: a diffusers folder or hub id with its configs
    loras: list[LoraWeight] = field(default_factory=list)  # merged into the U-Net, in order


@dataclass(frozen=True)
class SampleParams:
    models: Annotated[list[SampledModel], NotEmpty()]
    prompts: Path = Path("data/prompts/posters.csv")
    negative_presets: Path = Path("data/prompts/negative_presets.yaml")
    lora_dir: Path = Path("models/lora")  # the LoRA files models name, tracked by dvc.yaml as a dependency
    # empty: every prompt in the file
    prompt_ids: list[str] = field(
        default_factory=lambda: ["pet_bag", "skincare_essence", "space_thriller", "mecha_anime"]
    )
    negative: list[str] = field(default_factory=lambda: ["basic"])  # presets for rows that name none
    negative_text: str = ""  # free text appended to every negative prompt
    images_per_prompt: Annotated[int, Bounds(ge=1)] = 2
    seed: int = 0  # image i of every prompt uses seed + i, for every model
    scheduler: SchedulerName = "euler"
    steps: Annotated[int, Bounds(ge=1)] = 4
    guidance_scale: Annotated[float, Bounds(ge=0)] = 5.0
    # rescales the guided prediction toward the conditional one's std (Lin et al. 2024): e.g. 0.7
    # for a v-prediction, zero-terminal-SNR fine-tune; 0 leaves it as it is
    guidance_rescale: Annotated[float, Bounds(ge=0, le=1)] = 0.0
    width: Annotated[int, Bounds(ge=8), MultipleOf(8)] = 64  # the VAE downscales by 8
    height: Annotated[int, Bounds(ge=8), MultipleOf(8)] = 96
    precision: Precision = "float"
    device: str = "auto"
    grid_cell_width: Annotated[int, Bounds(ge=16)] = 128
    # prompts past 75 tokens are encoded in 75-token chunks up to this length, as training does
    max_token_length: Literal[75, 150, 225] = 225
    output: Path = Path("data/samples")

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        for i, model in enumerate(self.models):
            if not MODEL_NAME.match(model.name):
                raise Invalid(f"models[{i}].name", f"{model.name!r} must be lower-case letters, digits, _ or -")
            if model.name in names[:i]:
                raise Invalid(f"models[{i}].name", f"{model.name!r} is used twice")
            for j, lora in enumerate(model.loras):
                if lora.path.suffix != ".safetensors":
                    raise Invalid(f"models[{i}].loras[{j}].path", f"{lora.path} is not a .safetensors file")
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
            guidance_rescale=self.guidance_rescale,
            width=self.width,
            height=self.height,
            precision=self.precision,
            max_token_length=self.max_token_length,
        )
