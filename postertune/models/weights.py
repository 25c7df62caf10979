"""A U-Net's weights one tensor at a time, without loading the whole model.

A diffusers U-Net folder (``config.json`` plus one ``diffusion_pytorch_model.safetensors`` or
shards listed in ``diffusion_pytorch_model.safetensors.index.json``) is read lazily: each
``get`` reads one tensor from disk. Other sources (a ``base.json`` pointer to a hub id or a
single file, ``tiny``) load the U-Net module once and hand out its tensors.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from postertune.errors import PipelineError
from postertune.models.loading import POINTER_FILE, UNET_WEIGHTS, load_pipeline, read_pointer

INDEX_FILE = UNET_WEIGHTS + ".index.json"


class UnetWeights(Protocol):
    config: dict

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class FolderWeights:
    """Lazy tensors of a diffusers U-Net folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / UNET_WEIGHTS).is_file():
            weight_map = None
        else:
            raise PipelineError(f"unet {self.folder}: no {UNET_WEIGHTS} (or its index)")
        self._stack = ExitStack()
        try:
            files = sorted(set(weight_map.values())) if weight_map else [UNET_WEIGHTS]
            handles = {name: self._stack.enter_context(safe_open(self.folder / name, framework="pt")) for name in files}
        except (SafetensorError, OSError) as exc:
            self._stack.close()
            raise PipelineError(f"unet {self.folder}: cannot read its weights ({exc})") from None
        if weight_map is None:
            only = handles[UNET_WEIGHTS]
            weight_map = dict.fromkeys(only.keys(), UNET_WEIGHTS)
        self._where = {key: handles[name] for key, name in weight_map.items()}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def close(self) -> None:
        self._stack.close()


class ModuleWeights:
    """Tensors of a U-Net loaded whole (sources that are not a diffusers folder on disk)."""

    def __init__(self, unet: torch.nn.Module):
        self.config = dict(unet.config)
        self._state = unet.state_dict()

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def close(self) -> None:
        self._state = {}


def unet_folder_of(base: Path | str) -> Path | None:
    """The U-Net folder inside a saved base (full folder or pointer to a local folder), if any."""
    base = Path(base)
    if (base / POINTER_FILE).is_file():
        source = read_pointer(base / POINTER_FILE)
        base = Path(source.base)
        if not base.is_dir():
            return None
    folder = base / "unet"
    return folder if (folder / "config.json").is_file() else None


def open_unet_weights(base_or_unet: Path | str) -> UnetWeights:
    """Lazy weights of a U-Net folder, a saved base's U-Net, or (loaded whole) any other base."""
    path = Path(base_or_unet)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return FolderWeights(path)
    folder = unet_folder_of(path)
    if folder is not None:
        return FolderWeights(folder)
    return ModuleWeights(load_pipeline(path).unet)
