"""Typed ``caption:`` params, checked before any data or model is touched."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from postertune.params import Bounds, Colour, Invalid, NotEmpty

CaptionerName = Literal["metadata", "blip", "wd14"]
Device = Literal["auto", "cpu", "cuda"]


def template_fields(template: str) -> list[str]:
    """The column names a ``str.format`` template refers to, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class MetadataParams:
    # Fields name columns of the image table; a missing field is dropped with its separator.
    template: str = "{title}, {genres}"  # short: comma-separated, so training can shuffle it
    long_template: str = "{title}, {genres} poster. {overview}"

    def __post_init__(self) -> None:
        for key in ("template", "long_template"):
            try:
                names = template_fields(getattr(self, key))
            except ValueError as exc:
                raise Invalid(key, f"not a valid template: {exc}") from None
            if not names:
                raise Invalid(key, "names no {column} field")
            bad = [n for n in names if not n.isidentifier()]
            if bad:
                raise Invalid(key, f"field {{{bad[0]}}} is not a plain column name")


@dataclass(frozen=True)
class BlipParams:
    model: str = "Salesforce/blip-image-captioning-large"  # hub id or local folder
    device: Device = "auto"
    dtype: Literal["float", "fp16", "bf16"] = "float"
    batch_size: Annotated[int, Bounds(ge=1)] = 8
    decoding: Literal["beam", "nucleus"] = "beam"
    num_beams: Annotated[int, Bounds(ge=1)] = 3
    top_p: Annotated[float, Bounds(gt=0, le=1)] = 0.9
    min_length: Annotated[int, Bounds(ge=1)] = 5
    max_length: Annotated[int, Bounds(ge=1)] = 40
    prefix: str = "a poster of"  # conditional captioning ("": unconditional)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_length > self.max_length:
            raise Invalid("min_length", f"must be at most max_length ({self.max_length})")

    def settings(self) -> dict:
        """What decides the captions (device and batch size do not)."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "decoding": self.decoding,
            "num_beams": self.num_beams if self.decoding == "beam" else None,
            "top_p": self.top_p if self.decoding == "nucleus" else None,
            "seed": self.seed if self.decoding == "nucleus" else None,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "prefix": self.prefix.strip(),
        }


@dataclass(frozen=True)
class Wd14Params:
    model: Path = Path("models/wd14/model.onnx")
    tags_csv: Path = Path("models/wd14/selected_tags.csv")
    device: Device = "auto"
    batch_size: Annotated[int, Bounds(ge=1)] = 8
    general_threshold: Annotated[float, Bounds(gt=0, lt=1)] = 0.35
    character_threshold: Annotated[float, Bounds(gt=0, lt=1)] = 0.85
    rating: bool = False  # prepend the most likely rating tag (general, sensitive, ...)
    undesired_tags: list[str] = field(default_factory=lambda: ["watermark", "signature", "artist name", "web address"])
    replace_underscores: bool = True
    always_first_tags: list[str] = field(default_factory=list)

    def settings(self) -> dict:
        return {
            "model": str(self.model),
            "tags_csv": str(self.tags_csv),
            "general_threshold": self.general_threshold,
            "character_threshold": self.character_threshold,
            "rating": self.rating,
            "undesired_tags": list(self.undesired_tags),
            "replace_underscores": self.replace_underscores,
            "always_first_tags": list(self.always_first_tags),
        }


@dataclass(frozen=True)
class CombineParams:
    # Fixed tags that open every tag list and short caption, so keep_tokens can pin them.
    prepend_tags: list[str] = field(default_factory=lambda: ["movie poster"])
    # Metadata columns whose values become tags too (genres), after the tagger's tags.
    tag_columns: list[str] = field(default_factory=lambda: ["genres"])
    # The short caption is the tag list when the tagger ran; otherwise the first of these.
    short_fallback: list[Literal["metadata", "blip"]] = field(default_factory=lambda: ["metadata", "blip"])
    # The long, descriptive caption: the first of these that has text, else the short one.
    long: list[Literal["blip", "metadata"]] = field(default_factory=lambda: ["blip", "metadata"])


@dataclass(frozen=True)
class ExportParams:
    kohya_json: bool = True  # kohya-ss fine-tuning metadata: {sha256: {"caption", "tags"}}
    sidecars: Literal["none", "caption", "caption_long"] = "caption"  # one <sha256>.txt per image
    images: bool = False  # copy the image bytes beside the sidecars as <sha256>.<ext>


@dataclass(frozen=True)
class CaptionParams:
    captioners: Annotated[list[CaptionerName], NotEmpty()] = field(default_factory=lambda: ["metadata"])
    chunk_size: Annotated[int, Bounds(ge=1)] = 64  # images captioned between two cache writes
    workers: Annotated[int, Bounds(ge=1)] = 2  # image-decoding threads
    max_pixels: Annotated[int, Bounds(ge=1)] = 50_000_000
    background: Colour = (255, 255, 255)  # transparent posters are composited onto this RGB colour
    metadata: MetadataParams = field(default_factory=MetadataParams)
    blip: BlipParams = field(default_factory=BlipParams)
    wd14: Wd14Params = field(default_factory=Wd14Params)
    combine: CombineParams = field(default_factory=CombineParams)
    export: ExportParams = field(default_factory=ExportParams)
    images: Path = Path("data/filtered/images.parquet")  # the filter stage's kept images
    shards: Path = Path("data/raw/shards")
    output: Path = Path("data/captions")  # captions.parquet, cache/ (per captioner), export/

    def __post_init__(self) -> None:
        if len(set(self.captioners)) != len(self.captioners):
            raise Invalid("captioners", f"lists a captioner twice: {self.captioners}")
