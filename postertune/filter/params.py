"""The ``filter:`` section of ``params.yaml``: the guide's quality rules and the stage's tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from PIL import Image

from postertune.params import Bounds, Invalid, NotEmpty


@dataclass(frozen=True)
class FilterParams:
    min_side: Annotated[int, Bounds(ge=1)] = 512
    max_side: Annotated[int, Bounds(ge=1)] = 1024
    min_kb_per_pixel: Annotated[float, Bounds(ge=0)] = 0.0005
    min_dpi: Annotated[float, Bounds(ge=0)] = 96.0
    missing_dpi: Literal["keep", "drop"] = "keep"
    min_aspect: Annotated[float, Bounds(gt=0)] = 0.5
    max_aspect: Annotated[float, Bounds(gt=0)] = 1.0
    allowed_formats: Annotated[tuple[str, ...], NotEmpty()] = ("JPEG", "PNG", "WEBP")
    table: Path = Path("data/dedup/images.parquet")  # the dedupe stage's table
    output: Path = Path("data/filtered")  # images.parquet (kept) and dropped.parquet

    def __post_init__(self) -> None:
        if self.max_side < self.min_side:
            raise Invalid("max_side", f"must be at least min_side ({self.min_side}), got {self.max_side}")
        if self.max_aspect < self.min_aspect:
            raise Invalid("max_aspect", f"must be at least min_aspect ({self.min_aspect}), got {self.max_aspect}")
        known = set(Image.registered_extensions().values())
        for index, name in enumerate(self.allowed_formats):
            if name not in known:
                raise Invalid(
                    f"allowed_formats[{index}]", f"{name!r} is not a Pillow format name such as JPEG, PNG, WEBP"
                )
