"""The LAION aesthetic predictor head: an affine MLP on the normalised CLIP image embedding
(shared by the stages that score images: curate and evaluate)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from postertune.errors import PipelineError

LAYER_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


class AestheticHead(nn.Module):
    """``sac+logos+ava1-l14-linearMSE.pth``'s layout: no activations between the layers,
    so the trained head is one affine map and its score is not bounded to 0–10."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @torch.no_grad()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        device = next(self.parameters()).device
        return self(torch.from_numpy(embeddings).float().to(device)).squeeze(-1).cpu().numpy()


def load_aesthetic_head(path: Path | None, input_size: int, seed: int, device: str) -> AestheticHead:
    """The published head from ``path``; without one a random head (seeded) of the same class."""
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AestheticHead(input_size).eval().to(device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise PipelineError(f"{path}: not a loadable weights file ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or sorted(state) != sorted(LAYER_KEYS):
        raise PipelineError(f"{path}: not an aesthetic head state dict (expected keys {', '.join(LAYER_KEYS)})")
    width = state["layers.0.weight"].shape[1]
    if width != input_size:
        raise PipelineError(f"{path}: head takes {width}-wide embeddings but the CLIP model gives {input_size}")
    head = AestheticHead(input_size)
    head.load_state_dict(state)
    return head.eval().to(device)
