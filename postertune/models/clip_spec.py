"""Which CLIP model and aesthetic head a scoring stage names: the checks its params run.

Torch-free, so a stage's params load without the model libraries. Every stage that scores
images with CLIP (curate, evaluate) declares the same four fields, ``clip_model``,
``clip_weights``, ``aesthetic_head`` and ``seed``, and checks them here;
``postertune.models.clip`` and ``postertune.models.aesthetic`` load what they name.
"""

from __future__ import annotations

from pathlib import Path

from postertune.params import Invalid

TINY_CLIP = "tiny"  # a tiny random open_clip model: every step runs, the numbers mean nothing


def check_clip_choice(clip_model: str, clip_weights: str | None, aesthetic_head: Path | None) -> None:
    """Raise ``Invalid`` (naming the field) for a combination that cannot score images."""
    if clip_model != TINY_CLIP and not clip_weights:
        raise Invalid("clip_weights", f"{clip_model} needs weights (a tag such as openai, a file or a folder)")
    if clip_weights == "openai" and "quickgelu" not in clip_model.lower():
        raise Invalid(
            "clip_model",
            f"{clip_model} builds GELU but the OpenAI weights need QuickGELU: use {clip_model}-quickgelu",
        )
    if aesthetic_head is None and clip_model != TINY_CLIP:
        raise Invalid("aesthetic_head", "name the LAION head (.pth); a random head is for the tiny model only")


def local_weights(clip_weights: str | None) -> Path | None:
    """The local file or folder the CLIP weights come from; None for a hub tag or none at all."""
    if clip_weights is None:
        return None
    path = Path(clip_weights)
    return path if path.exists() or "/" in clip_weights or path.suffix else None
