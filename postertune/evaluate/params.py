"""``evaluate:`` params: the scoring models, the comparison and its statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from postertune.devices import check_device, resolve_device
from postertune.models.clip_spec import check_clip_choice, local_weights
from postertune.params import Bounds, Colour


@dataclass(frozen=True)
class CmmdParams:
    """CLIP-embedding MMD between each model's images and real posters (Jayasumana et al. 2024)."""

    enabled: bool = True
    images: Path = Path("data/filtered/images.parquet")
    shards: Path = Path("data/raw/shards")
    max_images: Annotated[int, Bounds(ge=2)] = 200
    background: Colour = (255, 255, 255)  # transparent posters are composited onto this RGB colour
    sigma: Annotated[float, Bounds(gt=0)] = 10.0
    scale: float = 1000.0


@dataclass(frozen=True)
class EvaluateParams:
    samples: Path = Path("data/samples")
    clip_model: str = "tiny"  # an open_clip model name (real: ViT-L-14-quickgelu), or "tiny"
    clip_weights: str | None = None  # a pretrained tag (hub, e.g. openai), a weights file or an open_clip folder
    aesthetic_head: Path | None = None  # sac+logos+ava1-l14-linearMSE.pth; none: random (tiny only)
    candidate: str = "finetuned"  # compared against every other sampled model
    seed: int = 0  # tiny models' weights and the bootstrap / permutation draws
    bootstrap_resamples: Annotated[int, Bounds(ge=100)] = 10000
    confidence: Annotated[float, Bounds(gt=0, lt=1)] = 0.95
    paired_test: Literal["wilcoxon", "permutation"] = "wilcoxon"
    batch_size: Annotated[int, Bounds(ge=1)] = 16
    device: str = "auto"
    cmmd: CmmdParams = field(default_factory=CmmdParams)
    output: Path = Path("data/eval")

    def __post_init__(self) -> None:
        check_clip_choice(self.clip_model, self.clip_weights, self.aesthetic_head)
        check_device("evaluate.device", self.device)

    @property
    def torch_device(self) -> str:
        return resolve_device("evaluate.device", self.device)

    @property
    def weights_path(self) -> Path | None:
        """The local file or folder the CLIP weights come from; None for a hub tag."""
        return local_weights(self.clip_weights)
