"""CMMD: maximum mean discrepancy with a Gaussian RBF kernel on CLIP embeddings.

As in "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"
(Jayasumana et al., CVPR 2024): the plain (biased) estimate over all pairs, diagonals
included, kernel exp(−‖x−y‖² / 2σ²) with σ = 10, reported ×1000. 0 means the two
sets of embeddings are indistinguishable by this kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.spatial.distance import cdist

from postertune.errors import PipelineError
from postertune.imagesafe import WHITE, ImageRejected, load_image
from postertune.store import ShardStore


def mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-gamma * cdist(a, b, "sqeuclidean")).mean())

    return scale * (kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y))


def reference_hashes(images_table: Path, store: ShardStore, max_images: int, seed: int) -> list[str]:
    """A seeded sample of up to ``max_images`` real posters (sha256s) listed in a table,
    every one present in ``store``."""
    try:
        table = pd.read_parquet(images_table, columns=["sha256"])
    except FileNotFoundError:
        raise PipelineError(f"{images_table}: reference image table not found") from None
    except (KeyError, ValueError, OSError) as exc:
        raise PipelineError(f"{images_table}: no readable sha256 column ({str(exc).splitlines()[0]})") from None
    hashes = sorted(set(table["sha256"].dropna()))
    if len(hashes) < 2:
        raise PipelineError(f"{images_table}: needs at least 2 reference images for CMMD, found {len(hashes)}")
    if len(hashes) > max_images:
        chosen = np.random.default_rng(seed).choice(len(hashes), size=max_images, replace=False)
        hashes = [hashes[i] for i in sorted(chosen)]
    absent = [sha for sha in hashes if sha not in store]
    if absent:
        raise PipelineError(
            f"{store.root}: image {absent[0]} listed in {images_table} is not stored ({len(absent)} missing)"
        )
    return hashes


def reference_loader(store: ShardStore, background: tuple[int, int, int] = WHITE) -> Callable[[str], Image.Image]:
    def load(sha: str) -> Image.Image:
        try:
            return load_image(store.read(sha), background=background)
        except ImageRejected as exc:
            raise PipelineError(f"{store.root}: image {sha} is unreadable ({exc.reason})") from None

    return load
