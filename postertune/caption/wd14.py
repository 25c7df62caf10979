"""The WD14 tagger: a SmilingWolf-style ONNX model run with onnxruntime.

The standard layout: one NHWC float32 input holding BGR pixels in 0..255, the image
padded to a square with white and resized to the model's input size; one output of
per-tag probabilities in the row order of ``selected_tags.csv`` (columns
tag_id,name,category,count; category 9 = rating, 0 = general, 4 = character).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from PIL import Image

from postertune.caption.cache import CaptionRecord
from postertune.caption.params import Wd14Params
from postertune.caption.tags import display_tag, tag_key, unique_tags
from postertune.errors import PipelineError
from postertune.params import ParamError

GENERAL, CHARACTER, RATING = 0, 4, 9


@dataclass(frozen=True)
class TagVocabulary:
    names: tuple[str, ...]
    categories: np.ndarray


def read_selected_tags(path: Path) -> TagVocabulary:
    try:
        frame = pd.read_csv(path, dtype={"name": str}, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"{path}: unreadable tag list ({type(exc).__name__})") from None
    missing = {"name", "category"} - set(frame.columns)
    if missing:
        raise PipelineError(
            f"{path}: needs columns name and category (WD14 selected_tags.csv), has {list(frame.columns)}"
        )
    categories = pd.to_numeric(frame["category"], errors="coerce")
    bad = categories.isna()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{path}: row {row + 2}: category {frame['category'].iloc[row]!r} is not a number")
    return TagVocabulary(tuple(frame["name"]), categories.to_numpy(dtype=np.int64))


def select_tags(probs: np.ndarray, vocab: TagVocabulary, params: Wd14Params) -> list[str]:
    """Tags above their category's threshold, most likely first, character tags
    before general ones, undesired tags removed and ``always_first_tags`` moved ahead."""
    cats = vocab.categories
    picked: list[int] = []
    if params.rating and (cats == RATING).any():
        ratings = np.flatnonzero(cats == RATING)
        picked.append(int(ratings[np.argmax(probs[ratings])]))
    for category, threshold in ((CHARACTER, params.character_threshold), (GENERAL, params.general_threshold)):
        hits = np.flatnonzero((cats == category) & (probs >= threshold))
        picked.extend(int(i) for i in hits[np.argsort(-probs[hits], kind="stable")])
    undesired = {tag_key(t) for t in params.undesired_tags}
    first = [tag_key(t) for t in params.always_first_tags]
    names = (display_tag(vocab.names[i], params.replace_underscores) for i in picked)
    tags = unique_tags([tag for tag in names if tag_key(tag) not in undesired])
    return sorted(tags, key=lambda t: first.index(tag_key(t)) if tag_key(t) in first else len(first))


def wd14_input(image: Image.Image, size: int) -> np.ndarray:
    """One HWC float32 BGR array: padded to a white square, resized to ``size``."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def onnx_providers(device: str, gpu: int = 0) -> list[str | tuple[str, dict]]:
    """``gpu``: which GPU, when one is used (each launched process has its own)."""
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise ParamError("caption.wd14.device", "cuda requested but onnxruntime has no CUDAExecutionProvider")
    if device != "cpu" and has_cuda:
        return [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Wd14Tagger:
    name = "wd14"

    def __init__(self, params: Wd14Params, gpu: int = 0):
        self.params = params
        for key in ("model", "tags_csv"):
            path = getattr(params, key)
            if not Path(path).is_file():
                raise ParamError(f"caption.wd14.{key}", f"{path} not found")
        self.vocab = read_selected_tags(params.tags_csv)
        providers = onnx_providers(params.device, gpu)
        try:
            self.session = ort.InferenceSession(str(params.model), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"{params.model}: not a loadable ONNX model ({reason})") from None
        model_input = self.session.get_inputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise PipelineError(f"{params.model}: expected a square NHWC input with 3 channels, got shape {shape}")
        self.input_name = model_input.name
        self.image_size = shape[1]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = self.fixed_batch or params.batch_size

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([wd14_input(image, self.image_size) for image in images])
        count = len(batch)
        if self.fixed_batch and count < self.fixed_batch:
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed_batch - count, axis=0)])
        probs = self.session.run(None, {self.input_name: batch})[0][:count]
        if probs.ndim != 2 or probs.shape[1] != len(self.vocab.names):
            raise PipelineError(
                f"{self.params.tags_csv}: lists {len(self.vocab.names)} tags but {self.params.model} "
                f"outputs shape {list(probs.shape)}"
            )
        return probs

    def caption(self, shas: list[str], images: list[Image.Image]) -> list[CaptionRecord]:
        probs = self.probabilities(images)
        return [
            CaptionRecord(sha, tags=tuple(select_tags(row, self.vocab, self.params)))
            for sha, row in zip(shas, probs, strict=True)
        ]
