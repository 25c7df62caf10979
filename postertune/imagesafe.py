"""Decode untrusted image bytes safely: every payload is hostile until proven an image.

Rejections carry a short reason code that lands in the image table and the metrics.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

Image.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb check is a warning below 2x its limit; ours is a hard cap per call.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 50_000_000


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    dpi: float | None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image") from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise ImageRejected("not_an_image", type(exc).__name__) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageRejected("not_an_image", "zero size")
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} exceeds {max_pixels} pixels")
    return img


def _dpi(img: Image.Image) -> float | None:
    dpi = img.info.get("dpi")
    if not dpi:
        return None
    try:
        value = float(min(dpi[0], dpi[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return round(value, 2) if value > 0 else None


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode ``data`` to RGB. ``draft`` lets JPEG decode at a reduced scale
    (DCT scaling): still reads every byte of the stream, so truncation is caught."""
    img = _open(data, max_pixels)
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
    except ImageRejected:
        raise
    except Exception as exc:
        reason = (
            "truncated" if "truncated" in str(exc).lower() or isinstance(exc, (OSError, SyntaxError)) else "corrupt"
        )
        raise ImageRejected(reason, str(exc)) from None
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" else img.convert("RGB")
    return img


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Prove ``data`` decodes completely and read its size, format and dpi."""
    img = _open(data, max_pixels)
    info = ImageInfo(width=img.width, height=img.height, format=str(img.format or "").upper(), dpi=_dpi(img))
    load_image(data, max_pixels, draft=(max(1, img.width // 8), max(1, img.height // 8)))
    return info
