"""Caption length in CLIP tokens: one encoder pass sees 77 (75 + BOS/EOS); a longer caption
needs more than one 75-token chunk (``models.prompts``), so such captions are counted."""

from __future__ import annotations

from postertune.models.tokenizer import clip_tokenizer

CLIP_CONTEXT = 77


def token_counts(texts: list[str]) -> list[int]:
    """Tokens per text with the real CLIP tokenizer, BOS and EOS included, untruncated."""
    if not texts:
        return []
    ids = clip_tokenizer()(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(row) for row in ids]
