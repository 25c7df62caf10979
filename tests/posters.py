"""Small synthetic posters for the scoring tests (evaluate, curate)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def poster(seed: int, size: tuple[int, int] = (64, 96), blank: bool = False) -> Image.Image:
    """A small synthetic poster: a coloured background, a few shapes and a title bar (``blank``:
    the background alone)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    if blank:
        return img
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(8, size[0] // 2), y0 + rng.integers(8, size[1] // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw.rectangle((0, size[1] - 14, size[0], size[1]), fill=(10, 10, 10))
    draw.text((3, size[1] - 13), f"No. {seed}", fill=(250, 250, 250))
    return img
