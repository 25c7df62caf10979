"""Content fingerprints: caches, checkpoints and samples are keyed by what produced them, not by names.

The one place the project hashes values, files and models; every stage that keys work by
content uses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a module is hashed: value and file hashes need no torch
    import torch

SHORT = 16  # hex digits of a fingerprint used in a folder or file name
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx"}


def fingerprint_json(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys; anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def short_fingerprint(value: Any) -> str:
    """The first ``SHORT`` hex digits of ``fingerprint_json``: enough to name a folder or a file."""
    return fingerprint_json(value)[:SHORT]


def _files(path: Path, weights: bool) -> list[Path]:
    if path.is_file():
        return [path]
    files = [
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not weights:
        files = [p for p in files if p.suffix not in WEIGHT_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def fingerprint_files(path: Path, weights: bool = True) -> str:
    """sha256 over the relative names and bytes of every file of a folder (a file: its bytes);
    with ``weights`` false, weight files are left out (a model's configs and tokenizers only)."""
    digest = hashlib.sha256()
    for file in _files(path, weights):
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        with file.open("rb") as f:
            digest.update(f"{name}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()


def fingerprint_module(module: torch.nn.Module, *extra: Any) -> str:
    """Hash of a model's config, every weight (name, dtype, shape, bytes) and ``extra`` values.

    Two folders holding the same weights give the same fingerprint; a changed VAE or
    text encoder gives a new one, so nothing cached with the old one is reused.
    """
    import torch

    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        config_dict = dict(config) if isinstance(config, dict) else config.to_dict()
        # where it was loaded from and which library version wrote it do not change the model
        kept = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(fingerprint_json(kept).encode())
    digest.update(fingerprint_json(list(extra)).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
