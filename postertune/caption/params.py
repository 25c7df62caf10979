"""Typed ``caption:`` params, checked before any data or model is touched."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from postertune.params import Colour, ParamError

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
            name = f"caption.metadata.{key}"
            try:
                names = template_fields(getattr(self, key))
            except ValueError as exc:
                raise ParamError(name, f"not a valid template: {exc}") from None
            if not names:
                raise ParamError(name, "names no {column} field")
            bad = [n for n in names if not n.isidentifier()]
            if bad:
                raise ParamError(name, f"field {{{bad[0]}}} is not a plain column name")


@dataclass(frozen=True)
class BlipParams:
    model: str = "Salesforce/blip-image-captioning-large"  # hub id or local folder
    device: Device = "auto"
    dtype: Literal["float", "fp16", "bf16"] = "float"
    batch_size: int = 8
    decoding: Literal["beam", "nucleus"] = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 40
    prefix: str = "a poster of"  # conditional captioning ("": unconditional)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParamError("caption.blip.batch_size", "must be at least 1")
        if self.num_beams < 1:
            raise ParamError("caption.blip.num_beams", "must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("caption.blip.top_p", "must lie in (0, 1]")
        if not 1 <= self.min_length <= self.max_length:
            raise ParamError("caption.blip.min_length", f"must lie in 1..max_length ({self.max_length})")

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
    batch_size: int = 8
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    rating: bool = False  # prepend the most likely rating tag (general, sensitive, ...)
    undesired_tags: list[str] = field(default_factory=lambda: ["watermark", "signature", "artist name", "web address"])
    replace_underscores: bool = True
    always_first_tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParamError("caption.wd14.batch_size", "must be at least 1")
        for name in ("general_threshold", "character_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ParamError(f"caption.wd14.{name}", "must lie strictly between 0 and 1")

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
    captioners: list[CaptionerName] = field(default_factory=lambda: ["metadata"])
    chunk_size: int = 64  # images captioned between two cache writes
    workers: int = 2  # image-decoding threads
    max_pixels: int = 50_000_000
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
        if not self.captioners:
            raise ParamError("caption.captioners", "name at least one of metadata, blip, wd14")
        if len(set(self.captioners)) != len(self.captioners):
            raise ParamError("caption.captioners", f"lists a captioner twice: {self.captioners}")
        if self.chunk_size < 1:
            raise ParamError("caption.chunk_size", "must be at least 1")
        if self.workers < 1:
            raise ParamError("caption.workers", "must be at least 1")
        if self.max_pixels < 1:
            raise ParamError("caption.max_pixels", "must be at least 1")
