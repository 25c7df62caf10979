"""Image embeddings shared among launched processes.

One process embeds every image itself (``scoring.embed_images``). Launched as several, the
processes share out the batches one process would make, so every batch holds the same images
whatever the process count; each batch's embeddings are saved as one part, named by the model
and the batch's images, so a killed launch keeps every finished batch and a rerun reuses it.
The main process reads the parts back in order once every process is done.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from postertune.atomic import atomic_path
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.scoring import batches, embed_images
from postertune.fingerprint import short_fingerprint
from postertune.launch import Processes
from postertune.models.clip import ClipEncoder, clip_fingerprint

PARTS_DIR = "parts"  # in params.output, until the main process has written the scores


class Embedder:
    def __init__(self, clip: ClipEncoder, params: EvaluateParams, processes: Processes):
        self.clip = clip
        self.params = params
        self.processes = processes
        self.parts = params.output / PARTS_DIR
        self.reused = 0  # images whose embeddings an earlier, killed launch left in parts

    def __call__(
        self, keys: Sequence, load: Callable[[object], Image.Image], identity: Callable[[object], object], desc: str
    ) -> np.ndarray | None:
        """Normalised embeddings of ``load(key)`` for every key, in order; ``identity(key)``
        is what decides the image a key loads. None in a process other than the main one."""
        size = self.params.batch_size
        if self.processes.count == 1:
            return embed_images(self.clip, keys, load, size, desc)
        model = clip_fingerprint(self.params)
        groups = list(batches(keys, size))
        paths = [self._part(model, [identity(k) for k in group]) for group in groups]
        missing = [i for i, path in enumerate(paths) if not path.exists()]
        self.reused += len(keys) - sum(len(groups[i]) for i in missing)
        todo = self.processes.share(missing)
        with tqdm(total=sum(len(groups[i]) for i in todo), desc=desc, unit="image") as bar:
            for i in todo:
                embeddings = self.clip.encode_images([load(k) for k in groups[i]])
                with atomic_path(paths[i]) as tmp, tmp.open("wb") as f:
                    np.save(f, embeddings)
                bar.update(len(groups[i]))
        self.processes.wait()
        if not self.processes.main:
            return None
        if not paths:
            return np.zeros((0, self.clip.embed_dim), dtype=np.float32)
        return np.concatenate([np.load(path) for path in paths])

    def remove_parts(self) -> None:
        """Once the scores are written (parts a killed launch left go too)."""
        if self.parts.exists():
            shutil.rmtree(self.parts)

    def _part(self, model: str, images: list) -> Path:
        return self.parts / f"{short_fingerprint([model, images])}.npy"
