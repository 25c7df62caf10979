"""CLIP image and text embeddings with open_clip, L2-normalised: one loader for every stage
that scores images (curate scores the training set, evaluate the generated samples)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from postertune.fingerprint import fingerprint_files, fingerprint_json
from postertune.models.clip_spec import TINY_CLIP
from postertune.params import ParamError

TINY_ARCHITECTURE = "ViT-L-14"
TINY_OVERRIDES = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)


class ClipChoice(Protocol):
    """The fields a scoring stage's params declare (``postertune.models.clip_spec``)."""

    clip_model: str
    clip_weights: str | None
    aesthetic_head: Path | None
    seed: int  # the tiny model's and the random head's weights

    @property
    def weights_path(self) -> Path | None: ...


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]  # truncates to the 77-token context
    device: str

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return _normalised(self.model.encode_image(batch))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return _normalised(self.model.encode_text(self.tokenizer(texts).to(self.device)))


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine of normalised embeddings: the CLIP score (torchmetrics reports ×100)."""
    return np.einsum("ij,ij->i", image_embeddings, text_embeddings)


def _open_clip(params: ClipChoice) -> ModuleType:
    if params.weights_path is not None or params.clip_model == TINY_CLIP:
        # huggingface_hub reads this once, on import: nothing here may reach the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    return open_clip


def check_weights(params: ClipChoice, section: str) -> None:
    """The CLIP weights and the aesthetic head named in params exist, before anything loads;
    errors name ``<section>.clip_weights`` or ``<section>.aesthetic_head``."""
    local = params.weights_path
    if local is not None and not local.exists():
        raise ParamError(f"{section}.clip_weights", f"{local} does not exist")
    if params.aesthetic_head is not None and not params.aesthetic_head.is_file():
        raise ParamError(f"{section}.aesthetic_head", f"{params.aesthetic_head} does not exist")
    if local is None and params.clip_model != TINY_CLIP:
        tags = _open_clip(params).list_pretrained_tags_by_model(params.clip_model)
        if params.clip_weights not in tags:
            raise ParamError(
                f"{section}.clip_weights",
                f"{params.clip_weights!r} is no file or folder here, nor a pretrained tag of {params.clip_model}"
                f" ({', '.join(tags) or 'none'})",
            )


def clip_fingerprint(params: ClipChoice) -> str:
    """What decides the image and text embeddings, without loading the model: the bytes of
    local weights, the name and tag of published ones, the seed and library versions of the
    tiny random model. Embeddings cached under one fingerprint are reused only with it."""
    local = params.weights_path
    if local is not None:
        source = {"files": fingerprint_files(local), "tiny": TINY_OVERRIDES if params.clip_model == TINY_CLIP else None}
    elif params.clip_model == TINY_CLIP:
        source = {"tiny": TINY_OVERRIDES, "seed": params.seed, "torch": torch.__version__.split("+")[0]}
    else:
        source = {"tag": params.clip_weights}
    return fingerprint_json({"model": params.clip_model, "open_clip": version("open_clip_torch"), **source})


def load_clip(params: ClipChoice, device: str) -> ClipEncoder:
    """An open_clip folder (``open_clip_config.json`` + weights), the tiny model (random or
    from a weights file), or a named model with a pretrained tag or weights file."""
    open_clip = _open_clip(params)
    local = params.weights_path
    if local is not None and local.is_dir():
        name = f"local-dir:{local}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
    elif params.clip_model == TINY_CLIP:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                TINY_ARCHITECTURE, pretrained=str(local) if local else None, **TINY_OVERRIDES
            )
        tokenizer = open_clip.get_tokenizer(TINY_ARCHITECTURE)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(
            params.clip_model, pretrained=str(local) if local else params.clip_weights
        )
        tokenizer = open_clip.get_tokenizer(params.clip_model)
    model.eval().to(device)
    return ClipEncoder(model, preprocess, tokenizer, device)
