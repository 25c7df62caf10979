"""``curate:`` params: the scoring models (the evaluate stage's), the selection rules, the plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from postertune.devices import check_device, resolve_device
from postertune.models.clip_spec import check_clip_choice, local_weights
from postertune.params import Bounds, Colour, Invalid


@dataclass(frozen=True)
class CurateParams:
    enabled: bool = True  # false: the curated table is the whole captioned set, nothing is scored
    # the scoring models; conf/base.yaml takes them from evaluate.*, so both stages score alike
    clip_model: str = "tiny"  # an open_clip model name (real: ViT-L-14-quickgelu), or "tiny"
    clip_weights: str | None = None  # a pretrained tag (hub, e.g. openai), a weights file or an open_clip folder
    aesthetic_head: Path | None = None  # sac+logos+ava1-l14-linearMSE.pth; none: random (tiny only)
    seed: int = 0  # the tiny model's and random head's weights, and the k-means start
    batch_size: Annotated[int, Bounds(ge=1)] = 16
    device: str = "auto"
    workers: Annotated[int, Bounds(ge=1)] = 2  # image-decoding threads
    chunk_size: Annotated[int, Bounds(ge=1)] = 256  # images scored between two writes of the cache
    max_pixels: Annotated[int, Bounds(ge=1)] = 50_000_000
    background: Colour = (255, 255, 255)  # transparent posters are composited onto this RGB colour
    # selection: floors first (inclusive; null: no floor), then top_k among what passes
    min_aesthetic: float | None = None
    min_clip_similarity: float | None = None
    similarity: Literal["max", "short", "long"] = "max"  # which caption's CLIP similarity the floor reads
    min_jpeg_quality: Annotated[int, Bounds(ge=1, le=100)] | None = 30  # JPEGs only
    min_pixel_std: Annotated[float, Bounds(ge=0)] | None = 2.0  # near-blank images: grey-level std, 0-255
    top_k: Annotated[int, Bounds(ge=1)] | None = 8  # null: keep every image that passes the floors
    clusters: Annotated[int, Bounds(ge=1)] = 2  # k-means clusters of the embeddings; top_k shared among them
    rank_by: Literal["aesthetic", "clip_similarity"] = "aesthetic"
    # plots
    sheet_size: Annotated[int, Bounds(ge=1)] = 16  # best and worst posters per source on a contact sheet
    strip_size: Annotated[int, Bounds(ge=1)] = 8  # posters per cluster strip
    thumbnail: Annotated[int, Bounds(ge=32)] = 128  # pixels, the long side of a thumbnail
    captions: Path = Path("data/captions/captions.parquet")  # the caption stage's table
    shards: Path = Path("data/raw/shards")
    output: Path = Path("data/curated")  # images.parquet, dropped.parquet, cache/, plots/

    def __post_init__(self) -> None:
        check_clip_choice(self.clip_model, self.clip_weights, self.aesthetic_head)
        check_device("curate.device", self.device)
        if self.clusters > 1 and self.top_k is None:
            raise Invalid("clusters", f"shares top_k among clusters: set top_k too, got clusters {self.clusters}")
        if self.top_k is not None and self.top_k < self.clusters:
            raise Invalid("top_k", f"must be at least clusters ({self.clusters}), got {self.top_k}")

    @property
    def torch_device(self) -> str:
        return resolve_device("curate.device", self.device)

    @property
    def weights_path(self) -> Path | None:
        """The local file or folder the CLIP weights come from; None for a hub tag."""
        return local_weights(self.clip_weights)
