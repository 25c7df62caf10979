"""Where model weights come from, and the checks made on that before loading anything.

A model source is one of:

- ``"tiny"``: the SDXL-architecture model with tiny widths and random weights (demo, tests);
- an existing local folder: a diffusers folder (``model_index.json``, or for a VAE
  ``config.json``);
- an existing local ``.safetensors`` file: a single-file checkpoint in the original layout
  (pickled ``.ckpt`` files are refused: loading them can run arbitrary code);
- a Hugging Face hub id ``owner/name``, loaded through the normal ``from_pretrained`` path
  (offline, that path needs the model in the local cache).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from postertune.errors import PipelineError
from postertune.params import ParamError

TINY = "tiny"
SourceKind = Literal["tiny", "folder", "file", "hub"]

# The hub's repo names: letters, digits, '-', '_', '.', at most 96 characters per part.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class ModelSource:
    """Everything needed to load a base model again: what the train stage records."""

    base: str
    vae: str | None = None
    single_file_config: str | None = None  # diffusers folder or hub id giving a single file's configs
    seed: int = 0  # the tiny model's weights


def classify(value: str) -> tuple[SourceKind | None, str]:
    """The kind of source ``value`` is, or ``None`` and what is wrong with it."""
    if value == TINY:
        return "tiny", ""
    path = Path(value)
    if path.is_dir():
        return "folder", ""
    if path.is_file():
        if path.suffix != ".safetensors":
            return None, f"{value}: not a .safetensors file (pickled checkpoints are not loaded)"
        return "file", ""
    looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(".safetensors") or value.count("/") > 1
    if looks_like_path:
        return None, f"{value}: no such file or folder"
    if not _HUB_ID.fullmatch(value):
        return None, f"{value}: no such file or folder, and not 'tiny' or a hub id owner/name"
    return "hub", ""


def validate_model_source(name: str, value: str) -> None:
    """Check, without loading anything, that ``value`` can name a model; ``ParamError(name)`` if not."""
    if not isinstance(value, str) or not value:
        raise ParamError(name, "expected 'tiny', a local folder or .safetensors file, or a hub id owner/name")
    kind, problem = classify(value)
    if kind is None:
        raise ParamError(name, problem)


def source_kind(label: str, value: str) -> SourceKind:
    """Like ``validate_model_source`` at load time: a one-line ``PipelineError`` naming ``label``."""
    kind, problem = classify(value)
    if kind is None:
        raise PipelineError(f"{label} {problem}")
    return kind
