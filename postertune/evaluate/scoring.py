"""Per-image scores: CLIP score (cosine and ×100) and LAION aesthetic score."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from postertune.models.aesthetic import AestheticHead
from postertune.models.clip import ClipEncoder, clip_scores

SCORE_COLUMNS = ["model", "prompt_id", "seed", "path", "clip_score", "clip_score_100", "aesthetic_score"]


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_images(
    clip: ClipEncoder, keys: Sequence, load: Callable[[object], Image.Image], batch_size: int, desc: str
) -> np.ndarray:
    """Normalised embeddings of ``load(key)`` for every key, in order."""
    parts = []
    with tqdm(total=len(keys), desc=desc, unit="image") as bar:
        for chunk in batches(keys, batch_size):
            parts.append(clip.encode_images([load(k) for k in chunk]))
            bar.update(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, clip.embed_dim), dtype=np.float32)


def score_samples(
    samples: pd.DataFrame, images: np.ndarray, clip: ClipEncoder, head: AestheticHead, batch_size: int
) -> pd.DataFrame:
    """Scores per sample row, from the rows' image embeddings (``images``, aligned with ``samples``)."""
    prompts = list(dict.fromkeys(samples["prompt"]))
    text = dict(
        zip(prompts, np.concatenate([clip.encode_texts(list(c)) for c in batches(prompts, batch_size)]), strict=True)
    )
    cosine = clip_scores(images, np.stack([text[p] for p in samples["prompt"]]))
    scores = samples[["model", "prompt_id", "seed", "path"]].copy()
    scores["clip_score"] = cosine
    scores["clip_score_100"] = 100.0 * cosine
    scores["aesthetic_score"] = head.score(images)
    return scores[SCORE_COLUMNS]
