"""JPEG quality from the quantisation tables: what a file's KB/pixel only stands in for.

Encoders built on libjpeg (Pillow, ImageMagick, most web pipelines) scale the standard
tables of ITU-T T.81 Annex K by a quality factor q: scale = 5000 / q below 50, else
200 - 2q, and entry = (standard × scale + 50) // 100 clamped to 1…255. The estimate is
the q whose scaled standard tables lie nearest the file's (squared log ratio, luminance
and chrominance), so a libjpeg file gives its quality back exactly and any other encoder
the nearest libjpeg equivalent. Entries are compared sorted, so the zig-zag or natural
order a decoder reports them in does not matter.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
CHROMINANCE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip
QUALITIES = np.arange(1, 101)


def scaled_tables(standard: tuple[int, ...]) -> np.ndarray:
    """(100, 64): the libjpeg table for every quality 1…100, entries sorted."""
    scale = np.where(QUALITIES < 50, 5000 // QUALITIES, 200 - 2 * QUALITIES)[:, None]
    tables = (np.asarray(standard)[None, :] * scale + 50) // 100
    return np.sort(np.clip(tables, 1, 255), axis=1).astype(np.float64)


_SCALED = (scaled_tables(LUMINANCE), scaled_tables(CHROMINANCE))


def estimate_quality(tables: dict[int, list[int]]) -> int | None:
    """The libjpeg quality (1…100) nearest to ``tables`` (table id → 64 entries); None without
    a usable luminance table."""
    distance = np.zeros(len(QUALITIES))
    used = 0
    for table_id, scaled in zip((0, 1), _SCALED, strict=True):
        entries = tables.get(table_id)
        if entries is None or len(entries) != 64:
            continue
        actual = np.sort(np.clip(np.asarray(entries, dtype=np.float64), 1, 255))
        distance += np.square(np.log(actual)[None, :] - np.log(scaled)).sum(axis=1)
        used += 1
    if used == 0 or 0 not in tables:
        return None
    return int(QUALITIES[int(np.argmin(distance))])


def jpeg_quality(image: Image.Image) -> int | None:
    """The estimated quality of an opened JPEG; None for any other format."""
    if image.format != "JPEG":
        return None
    return estimate_quality(getattr(image, "quantization", None) or {})
