"""``metrics/caption.json``: coverage, caption lengths in CLIP tokens, truncations,
images per captioner and images skipped by reason."""

from __future__ import annotations

from collections import defaultdict

import pandas as pd

from postertune.caption.cache import CaptionRecord
from postertune.caption.tokens import CLIP_CONTEXT, token_counts


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def caption_metrics(kept: int, captions: pd.DataFrame, results: dict[str, dict[str, CaptionRecord]]) -> dict:
    short = token_counts(captions["caption"].tolist())
    long = token_counts(captions["caption_long"].tolist())
    skipped: dict[str, set[str]] = defaultdict(set)
    for found in results.values():
        for record in found.values():
            if record.skip:
                skipped[record.skip].add(record.sha256)
    return {
        "images": kept,
        "captioned": len(captions),
        "coverage": round(len(captions) / kept, 6) if kept else 0.0,
        "dropped": kept - len(captions),
        "tokens": {
            "caption_mean": _mean(short),
            "caption_long_mean": _mean(long),
            "caption_max": max(short, default=0),
            "caption_long_max": max(long, default=0),
        },
        # past one 75-token chunk: training encodes them in chunks up to train.max_token_length
        "multi_chunk": {
            "caption": sum(n > CLIP_CONTEXT for n in short),
            "caption_long": sum(n > CLIP_CONTEXT for n in long),
        },
        "captioner": {name: sum(bool(r.text or r.tags) for r in found.values()) for name, found in results.items()},
        "skipped": {reason: len(shas) for reason, shas in sorted(skipped.items())},
    }
