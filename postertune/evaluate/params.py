"""``evaluate:`` params: the scoring models, the comparison and its statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from postertune.devices import check_device, resolve_device
from postertune.params import Colour, ParamError

TINY_CLIP = "tiny"  # a tiny random open_clip model: every step runs, the numbers mean nothing


@dataclass(frozen=True)
class CmmdParams:
    """CLIP-embedding MMD between each model's images and real posters (Jayasumana et al. 2024)."""

    enabled: bool = True
    images: Path = Path("data/filtered/images.parquet")
    shards: Path = Path("data/raw/shards")
    max_images: int = 200
    background: Colour = (255, 255, 255)  # transparent posters are composited onto this RGB colour
    sigma: float = 10.0
    scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.max_images < 2:
            raise ParamError("evaluate.cmmd.max_images", "must be at least 2")
        if self.sigma <= 0:
            raise ParamError("evaluate.cmmd.sigma", "must be positive")


@dataclass(frozen=True)
class EvaluateParams:
    samples: Path = Path("data/samples")
    clip_model: str = "tiny"  # an open_clip model name (real: ViT-L-14-quickgelu), or "tiny"
    clip_weights: str | None = None  # a pretrained tag (hub, e.g. openai), a weights file or an open_clip folder
    aesthetic_head: Path | None = None  # sac+logos+ava1-l14-linearMSE.pth; none: random (tiny only)
    candidate: str = "finetuned"  # compared against every other sampled model
    seed: int = 0  # tiny models' weights and the bootstrap / permutation draws
    bootstrap_resamples: int = 10000
    confidence: float = 0.95
    paired_test: Literal["wilcoxon", "permutation"] = "wilcoxon"
    batch_size: int = 16
    device: str = "auto"
    cmmd: CmmdParams = field(default_factory=CmmdParams)
    output: Path = Path("data/eval")

    def __post_init__(self) -> None:
        if self.clip_model != TINY_CLIP and not self.clip_weights:
            raise ParamError(
                "evaluate.clip_weights", f"{self.clip_model} needs weights (a tag such as openai, a file or a folder)"
            )
        if self.clip_weights == "openai" and "quickgelu" not in self.clip_model.lower():
            raise ParamError(
                "evaluate.clip_model",
                f"{self.clip_model} builds GELU but the OpenAI weights need QuickGELU: use {self.clip_model}-quickgelu",
            )
        if self.aesthetic_head is None and self.clip_model != TINY_CLIP:
            raise ParamError(
                "evaluate.aesthetic_head", "name the LAION head (.pth); a random head is for the tiny model only"
            )
        if not 0 < self.confidence < 1:
            raise ParamError("evaluate.confidence", "must lie strictly between 0 and 1")
        if self.bootstrap_resamples < 100:
            raise ParamError("evaluate.bootstrap_resamples", "must be at least 100")
        if self.batch_size < 1:
            raise ParamError("evaluate.batch_size", "must be at least 1")
        check_device("evaluate.device", self.device)

    @property
    def torch_device(self) -> str:
        return resolve_device("evaluate.device", self.device)

    @property
    def weights_path(self) -> Path | None:
        """The local file or folder the CLIP weights come from; None for a hub tag."""
        if self.clip_weights is None:
            return None
        path = Path(self.clip_weights)
        return path if path.exists() or "/" in self.clip_weights or path.suffix else None
