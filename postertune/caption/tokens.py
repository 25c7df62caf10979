"""Caption length in CLIP tokens: one encoder pass sees 77 (75 + BOS/EOS); a longer caption
needs more than one 75-token chunk (``models.prompts``), so such captions are counted."""

from __future__ import annotations

from postertune.models.tokenizer import clip_tokenizer

CLIP_CONTEXT = 77
TEXTS_PER_CALL = 10_000  # the tokenizer's id lists for a million captions at once take gigabytes


def token_counts(texts: list[str]) -> list[int]:
    """Tokens per text with the real CLIP tokenizer, BOS and EOS included, untruncated."""
    tokenizer = clip_tokenizer() if texts else None
    counts: list[int] = []
    for start in range(0, len(texts), TEXTS_PER_CALL):
        part = list(texts[start : start + TEXTS_PER_CALL])
        ids = tokenizer(part, add_special_tokens=True, truncation=False, verbose=False, return_attention_mask=False)
        counts += [len(row) for row in ids["input_ids"]]
    return counts
