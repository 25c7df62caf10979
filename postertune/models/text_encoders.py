"""Trained text encoders beside a fine-tuned U-Net: ``models/text_encoders/``.

The folder holds a diffusers-layout subfolder (``config.json`` + ``model.safetensors``) per
encoder that trained, named as the pipeline names it (``text_encoder``, ``text_encoder_2``);
it is empty when none trained. ``CLIPTextModel.from_pretrained("models/text_encoders/text_encoder")``
loads one; ``load_text_encoders`` puts every one found into a pipeline in place of the base's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from postertune.atomic import atomic_dir
from postertune.models.precision import Precision
from postertune.models.safetensors_writer import cast_when_written, write_safetensors

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHTS = "model.safetensors"


def save_text_encoders(folder: Path | str, encoders: dict[str, torch.nn.Module], precision: Precision) -> Path:
    """Write ``encoders`` (by pipeline name) in ``precision``, atomically; the models themselves are not cast."""
    with atomic_dir(folder) as tmp:
        for name, encoder in encoders.items():
            (tmp / name).mkdir()
            encoder.config.save_pretrained(tmp / name)
            write_safetensors(
                tmp / name / WEIGHTS, cast_when_written(encoder.state_dict(), precision), {"format": "pt"}
            )
    return Path(folder)


def saved_text_encoders(folder: Path | str) -> list[str]:
    """The pipeline names of the encoders saved in ``folder``."""
    return [name for name in TEXT_ENCODERS if (Path(folder) / name / WEIGHTS).is_file()]


def load_text_encoders(pipe: StableDiffusionXLPipeline, folder: Path | str, dtype: torch.dtype) -> None:
    """Replace the pipeline's text encoders by those saved in ``folder``, each of the base's class."""
    for name in saved_text_encoders(folder):
        encoder = type(getattr(pipe, name)).from_pretrained(Path(folder) / name, dtype=dtype, use_safetensors=True)
        pipe.register_modules(**{name: encoder})
