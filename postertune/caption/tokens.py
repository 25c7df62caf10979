"""Caption length in CLIP tokens: SDXL's text encoders see 77 (75 + BOS/EOS), the rest
is cut off, so captions longer than that are counted and reported."""

from __future__ import annotations

from postertune.models.tokenizer import clip_tokenizer

CLIP_CONTEXT = 77


def token_counts(texts: list[str]) -> list[int]:
    """Tokens per text with the real CLIP tokenizer, BOS and EOS included, untruncated."""
    if not texts:
        return []
    ids = clip_tokenizer()(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(row) for row in ids]
