"""Content fingerprints: caches and checkpoints are keyed by what produced them, not by names."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def fingerprint_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_module(module: torch.nn.Module, *extra: Any) -> str:
    """Hash of a model's config, every weight (name, dtype, shape, bytes) and ``extra`` values.

    Two folders holding the same weights give the same fingerprint; a changed VAE or
    text encoder gives a new one, so nothing cached with the old one is reused.
    """
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
