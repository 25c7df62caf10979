"""A disk cache of caption encodings (``models.prompts``) for runs whose captions never change.

When caption augmentation is on, captions differ from step to step and are encoded on
the fly; otherwise each is encoded once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from postertune.atomic import atomic_path
from postertune.models.prompts import PromptEncoder


class TextCache:
    def __init__(self, root: Path, encoder_id: str):
        self.folder = Path(root) / "text" / encoder_id

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(caption.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(self.path(caption))
        return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

    def fill(self, captions: list[str], encode: PromptEncoder, batch_size: int, show_progress: bool = True) -> int:
        todo = [c for c in dict.fromkeys(captions) if not self.path(c).is_file()]
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text embeddings", disable=not show_progress):
            chunk = todo[start : start + batch_size]
            embeds, pooled = encode(chunk)
            for caption, e, p in zip(chunk, embeds.cpu(), pooled.cpu(), strict=True):
                with atomic_path(self.path(caption)) as tmp:
                    save_file({"prompt_embeds": e.contiguous(), "pooled_prompt_embeds": p.contiguous()}, str(tmp))
        return len(todo)
