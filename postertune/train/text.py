"""SDXL prompt encoding, and a disk cache of it for runs whose captions never change.

SDXL conditions on the penultimate hidden states of both CLIP text encoders,
concatenated (768 + 1280 = 2048 wide for the real model), and on the pooled,
projected output of the second. When caption augmentation is on, captions differ
from step to step and are encoded on the fly; otherwise each is encoded once.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from postertune.atomic import atomic_path
from postertune.fingerprint import fingerprint_module


class PromptEncoder:
    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        self.pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, 77, D1 + D2], pooled_prompt_embeds [B, P])."""
        hidden = []
        for tokenizer, encoder in self.pairs:
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out.text_embeds

    @cached_property
    def cache_id(self) -> str:
        (tok1, enc1), (tok2, enc2) = self.pairs
        return fingerprint_module(enc2, fingerprint_module(enc1), tok1.pad_token, tok2.pad_token, len(tok1))[:16]


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
