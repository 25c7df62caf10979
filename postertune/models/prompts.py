"""SDXL prompt encoding, with prompts past CLIP's 77 tokens encoded in chunks.

SDXL conditions on the penultimate hidden states of both CLIP text encoders,
concatenated (768 + 1280 = 2048 wide for the real model), and on the pooled, projected
output of the second. A text longer than 75 tokens is split, as AUTOMATIC1111 and
kohya-ss do, into 75-token chunks; each chunk is encoded on its own as BOS + 75 tokens +
EOS (padded) and the chunks' hidden states are concatenated along the sequence, so
``max_token_length`` 225 gives 3 × 77 positions. Every text of a call gets the same
number of chunks (empty ones hold BOS, EOS and padding), so shapes never vary; the
pooled output is the first chunk's. With ``max_token_length`` 75 this is exactly the
encoding diffusers' SDXL pipeline does.
"""

from __future__ import annotations

from functools import cached_property

import torch

from postertune.fingerprint import fingerprint_module

CHUNK = 75  # tokens of text per chunk; BOS and EOS make it CLIP's 77
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya-ss's --max_token_length choices


def chunk_ids(tokenizer, texts: list[str], chunks: int) -> torch.Tensor:
    """Token ids ``[len(texts) * chunks, CHUNK + 2]``: text i's chunk j at row ``i * chunks + j``.
    Tokens past ``chunks * CHUNK`` are cut."""
    body = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in body:
        for j in range(chunks):
            part = ids[j * CHUNK : (j + 1) * CHUNK]
            rows.append([bos, *part, eos] + [pad] * (CHUNK - len(part)))
    return torch.tensor(rows, dtype=torch.long)


def chunks_needed(tokenizer, text: str) -> int:
    """How many 75-token chunks ``text`` fills (at least one)."""
    count = len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    return max(1, -(-count // CHUNK))


class PromptEncoder:
    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, max_token_length: int = CHUNK):
        if max_token_length not in MAX_TOKEN_LENGTHS:
            raise ValueError(f"max_token_length {max_token_length} is not one of {MAX_TOKEN_LENGTHS}")
        self.pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]
        self.chunks = max_token_length // CHUNK

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds ``[B, 77 * chunks, D1 + D2]``, pooled_prompt_embeds ``[B, P]``)."""
        return self.encode(texts)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As a call, with gradients flowing into encoders that train."""
        hidden = []
        for tokenizer, encoder in self.pairs:
            ids = chunk_ids(tokenizer, texts, self.chunks)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            states = out.hidden_states[-2]
            hidden.append(states.reshape(len(texts), self.chunks * states.shape[1], states.shape[2]))
        pooled = out.text_embeds.reshape(len(texts), self.chunks, -1)[:, 0]
        return torch.cat(hidden, dim=-1), pooled

    @cached_property
    def cache_id(self) -> str:
        (tok1, enc1), (tok2, enc2) = self.pairs
        parts = (fingerprint_module(enc1), tok1.pad_token, tok2.pad_token, len(tok1))
        if self.chunks > 1:  # one chunk keeps the id it always had
            parts += (self.chunks,)
        return fingerprint_module(enc2, *parts)[:16]
