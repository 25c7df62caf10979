"""LoRAs of several ranks from the fine-tuned U-Net minus the base, one layer at a time.

Each Linear and Conv weight delta is factored once by SVD (``delta = U S Vh``); a rank-r LoRA
keeps the first r singular triplets, split evenly (``up = U √S``, ``down = √S Vh``), so every
requested rank comes from the same factorisation and its error is known exactly: the
Frobenius norm of the singular values left out. 3×3 convs get their own rank (kohya-ss
``conv_dim``); Linear layers and 1×1 convs get the file's rank. A layer whose delta is at most
``skip_threshold`` of its weight's norm is left out (its whole delta then counts as error).

Only two weights of one layer are in memory at a time (read lazily from the U-Net folders)
plus the factors kept so far, so a full-size SDXL pair never needs two U-Nets in memory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from postertune.atomic import atomic_path
from postertune.errors import PipelineError
from postertune.models.lora import (
    ALPHA,
    DOWN,
    SDXL_BASE_VERSION,
    SDXL_LORA_ARCHITECTURE,
    UP,
    kernel_kind,
    kohya_names,
    unet_layers,
)
from postertune.models.precision import Precision, torch_dtype
from postertune.models.safetensors_writer import pending, write_safetensors
from postertune.models.weights import UnetWeights

KINDS = ("linear", "conv1x1", "conv3x3")


@dataclass
class Factored:
    """One layer's delta: the leading singular triplets (√S folded into both sides) and all of S."""

    shape: tuple[int, ...]
    up: torch.Tensor  # fan-out × k
    down: torch.Tensor  # k × fan-in
    singular: torch.Tensor  # the singular values found, descending: all of them, or (randomized) the leading ones
    norm2: float  # ||delta||²
    complete: bool  # singular holds every singular value

    @property
    def kind(self) -> str:
        return kernel_kind(self.shape)

    def left_out(self, k: int) -> float:
        """||delta - rank-k LoRA||²: the singular values left out; with a randomized SVD, ||delta||² less
        those kept (exact too: its rank-k factors are the projection of delta onto k orthonormal columns)."""
        if self.complete:
            return float(self.singular[k:].double().pow(2).sum())
        return max(self.norm2 - float(self.singular[:k].double().pow(2).sum()), 0.0)

    def tensors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of rank ``rank`` in the kohya shapes (convs: k×in×kh×kw and out×k×1×1)."""
        k = min(rank, self.up.shape[1])
        up, down = self.up[:, :k], self.down[:k]
        if len(self.shape) == 4:
            up = up.reshape(self.shape[0], k, 1, 1)
            down = down.reshape(k, *self.shape[1:])
        return down.to(dtype).contiguous(), up.to(dtype).contiguous()


@dataclass
class Extraction:
    layers: dict[str, Factored]  # by diffusers module name, in the U-Net's order
    delta_norm2: dict[str, float]  # every layer's ||delta||², skipped ones included
    skipped: list[str]  # below the threshold (or a 3×3 conv when conv_rank is 0)
    conv_rank: int
    seconds: float
    config: dict  # the U-Net's, for the kohya key names
    shapes: dict[str, tuple[int, ...]]  # every layer's weight shape

    def rank_of(self, kind: str, rank: int) -> int:
        return self.conv_rank if kind == "conv3x3" else rank

    def kept(self, name: str, rank: int) -> int:
        layer = self.layers[name]
        return min(self.rank_of(layer.kind, rank), layer.up.shape[1])

    def relative_error(self, rank: int, kinds: tuple[str, ...] = KINDS) -> float:
        """||delta - LoRA||_F / ||delta||_F over every layer of these kinds (0 when nothing changed)."""
        total = left = 0.0
        for name, norm2 in self.delta_norm2.items():
            layer = self.layers.get(name)
            kind = kernel_kind(self.shapes[name])
            if kind not in kinds:
                continue
            total += norm2
            if layer is None:
                left += norm2
            else:
                left += layer.left_out(self.kept(name, rank))
        return math.sqrt(left / total) if total > 0 else 0.0


def check_same_architecture(base: UnetWeights, tuned: UnetWeights) -> dict[str, tuple[int, ...]]:
    layers = unet_layers(tuned.config)
    if unet_layers(base.config) != layers:
        raise PipelineError("lora: the base and fine-tuned U-Nets differ in architecture (their configs' layers)")
    return layers


@torch.no_grad()
def extract(
    base: UnetWeights,
    tuned: UnetWeights,
    ranks: list[int],
    conv_rank: int,
    skip_threshold: float,
    device: str = "cpu",
    svd: str = "full",
    progress=None,
) -> Extraction:
    """Factor every Linear/Conv delta of ``tuned`` against ``base``, keeping up to ``max(ranks)``."""
    layers = check_same_architecture(base, tuned)
    started = time.monotonic()
    max_rank = max(ranks)
    factored: dict[str, Factored] = {}
    norms: dict[str, float] = {}
    skipped: list[str] = []
    for name, shape in layers.items():
        key = f"{name}.weight"
        before = base.get(key).to(device, torch.float32)
        delta = tuned.get(key).to(device, torch.float32) - before
        if tuple(delta.shape) != shape:
            raise PipelineError(f"lora: {key} has shape {tuple(delta.shape)}, its config says {shape}")
        norm = float(torch.linalg.vector_norm(delta))
        norms[name] = norm * norm
        limit = conv_rank if kernel_kind(shape) == "conv3x3" else max_rank
        if norm == 0 or norm <= skip_threshold * float(torch.linalg.vector_norm(before)) or limit == 0:
            skipped.append(name)
            continue
        del before
        u, s, vh, complete = factor(delta.reshape(shape[0], -1), limit, svd)
        k = min(limit, s.shape[0])
        root = s[:k].sqrt()
        factored[name] = Factored(
            shape=shape,
            up=(u[:, :k] * root).cpu(),
            down=(root[:, None] * vh[:k]).cpu(),
            singular=s.cpu(),
            norm2=norm * norm,
            complete=complete,
        )
        del u, s, vh, delta
        if progress is not None:
            progress(name)
    return Extraction(factored, norms, skipped, conv_rank, time.monotonic() - started, dict(tuned.config), layers)


def factor(matrix: torch.Tensor, rank: int, svd: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(U, S, Vh, complete)`` of ``matrix``: LAPACK's full SVD (of the taller orientation, which is
    faster), or a randomized one (Halko et al., ``torch.svd_lowrank``) of ``rank`` + 8 columns and
    4 power iterations when that is well below the matrix's rank."""
    rows, cols = matrix.shape
    smaller = min(rows, cols)
    if svd == "randomized" and rank + 8 < smaller // 2:
        u, s, v = torch.svd_lowrank(matrix, q=rank + 8, niter=4)
        return u, s, v.T, False
    if rows < cols:
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        return uh.T, s, v.T, True
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh, True


def lora_tensors(extraction: Extraction, rank: int, precision: Precision) -> dict[str, torch.Tensor]:
    """The rank-``rank`` LoRA in the kohya key layout, alpha = rank of each layer (scale 1)."""
    dtype = torch_dtype(precision)
    names = kohya_names(extraction.layers, extraction.config)
    tensors = {}
    for name in extraction.layers:
        down, up = extraction.layers[name].tensors(extraction.kept(name, rank), dtype)
        prefix = names[name]
        tensors[f"{prefix}.{DOWN}"] = down
        tensors[f"{prefix}.{UP}"] = up
        tensors[f"{prefix}.{ALPHA}"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return tensors


def lora_metadata(extraction: Extraction, rank: int, base_model: str, finetuned: str) -> dict[str, str]:
    """kohya-ss ``ss_*`` and ModelSpec keys (what the UIs read), and this extraction's own."""
    counts = {kind: 0 for kind in KINDS}
    for layer in extraction.layers.values():
        counts[layer.kind] += 1
    ranks = {"linear": rank, "conv1x1": rank, "conv3x3": extraction.conv_rank}
    args = {"conv_dim": str(extraction.conv_rank), "conv_alpha": str(extraction.conv_rank)}
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps(args, sort_keys=True) if extraction.conv_rank else "null",
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": SDXL_LORA_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{Path(finetuned).name} minus {base_model}, rank {rank}",
        "postertune.base_model": base_model,
        "postertune.finetuned_unet": str(finetuned),
        "postertune.rank": str(rank),
        "postertune.ranks": json.dumps(ranks, sort_keys=True),
        "postertune.layers": json.dumps(counts, sort_keys=True),
        "postertune.relative_error": f"{extraction.relative_error(rank):.6g}",
    }


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """One ``.safetensors``, written atomically with its metadata keys in a fixed order."""
    with atomic_path(path) as tmp:
        write_safetensors(tmp, {key: pending(t) for key, t in tensors.items()}, metadata)
    return path
