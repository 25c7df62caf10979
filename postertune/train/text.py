"""A disk cache of caption encodings (``models.prompts``) for runs whose captions never change.

When caption augmentation is on, captions differ from step to step and are encoded on
the fly; otherwise each is encoded once, keyed by the sha256 of the caption, and packed
into shards (``packed``) in a folder named by the text encoders' fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from postertune.models.prompts import PromptEncoder
from postertune.train.packed import MAX_BYTES, MAX_ENTRIES, PackedTensors


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TextCache:
    def __init__(self, root: Path, encoder_id: str, shard_entries: int = MAX_ENTRIES, shard_bytes: int = MAX_BYTES):
        self.folder = Path(root) / "text" / encoder_id
        self.packed = PackedTensors(self.folder, shard_entries, shard_bytes)

    def load(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.packed.get(caption_key(caption))
        return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]

    def fill(self, captions: list[str], encode: PromptEncoder, batch_size: int, show_progress: bool = True) -> int:
        """Encode every caption not cached yet; returns how many were encoded."""
        unique = list(dict.fromkeys(captions))
        absent = set(self.packed.missing(caption_key(c) for c in unique))
        todo = [c for c in unique if caption_key(c) in absent]
        with self.packed.writer() as writer:
            for start in tqdm(
                range(0, len(todo), batch_size), desc="caching text embeddings", disable=not show_progress
            ):
                chunk = todo[start : start + batch_size]
                embeds, pooled = encode(chunk)
                for caption, e, p in zip(chunk, embeds, pooled, strict=True):
                    writer.add(caption_key(caption), {"prompt_embeds": e, "pooled_prompt_embeds": p})
        return len(todo)
