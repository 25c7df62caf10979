"""Caption augmentation, decided afresh for every sample of every step.

Short captions are comma-separated tags with the chosen tags first; ``keep_tokens``
of them stay in front while the rest are shuffled. Long captions are prose and are
never shuffled. The random draws come from a generator seeded per sample and step,
so two runs (or a resumed run) see the same captions, and no decision is frozen when
anything is cached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from postertune.train.params import TrainParams


@dataclass(frozen=True)
class CaptionPolicy:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    long_ratio: float = 0.0

    @classmethod
    def from_params(cls, params: TrainParams) -> CaptionPolicy:
        return cls(params.shuffle_caption, params.keep_tokens, params.caption_dropout_rate, params.long_caption_ratio)

    def choose(self, short: str, long: str, rng: random.Random) -> str:
        """The caption one sample trains with at one step ("" when dropped, for classifier-free guidance)."""
        if self.dropout_rate and rng.random() < self.dropout_rate:
            return ""
        if long and self.long_ratio and rng.random() < self.long_ratio:
            return long
        return shuffle_tags(short, self.keep_tokens, rng) if self.shuffle else short

    def fixed(self, short: str, long: str) -> str:
        """The one caption an image always gets when nothing is augmented."""
        return long if long and self.long_ratio >= 1.0 else short


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle the tags after the first ``keep_tokens``, which keep their places."""
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)
