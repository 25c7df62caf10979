"""Decode untrusted image bytes safely: every payload is hostile until proven an image.

Rejections carry a short reason code that lands in the image table and the metrics.

Every decoded image comes out as 8-bit RGB as the poster shows it: turned upright by its
EXIF orientation (so a portrait stored as 800x600 with Orientation 6 is 600x800 here, and
in the size the fetch stage records), a 16-bit image is scaled (never clipped) to 8
bits, transparency is composited onto a background colour (white unless a caller says
otherwise) instead of exposing the RGB hidden under it, a palette is expanded with its
transparency, and CMYK is converted through its embedded ICC profile when it has one.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

Image.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb check is a warning below 2x its limit; ours is a hard cap per call.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)
_SRGB = ImageCms.createProfile("sRGB")
# EXIF Orientation 2-8: the transpose that shows the stored pixels upright (as Pillow's ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = {5, 6, 7, 8}


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header of ``data`` (nothing decoded yet); refuse empty, unknown and oversized images."""
    if not data:
        raise ImageRejected("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. damaged EXIF: Pillow reads what it can
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


def dpi_of(img: Image.Image) -> float | None:
    dpi = img.info.get("dpi")
    if not dpi:
        return None
    try:
        value = float(min(dpi[0], dpi[1]))
    except (TypeError, ValueError, IndexError):
        return None
    return round(value, 2) if value > 0 else None


def load_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Fully decode ``data`` to upright RGB. ``draft`` lets JPEG decode at a reduced scale
    (DCT scaling): still reads every byte of the stream, so truncation is caught.
    Transparent pixels are composited onto ``background``."""
    return decode(open_image(data, max_pixels), draft, background)[0]


def decode(
    img: Image.Image, draft: tuple[int, int] | None, background: tuple[int, int, int], grey: bool = False
) -> tuple[Image.Image, int]:
    """``img`` loaded, as upright RGB, and the EXIF orientation that was applied. ``grey``: the
    caller only needs luminance, so a colour JPEG decodes its luma plane alone and comes out
    grey (no colour conversion or chroma upsampling; each value within rounding of RGB-to-L)."""
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("L" if grey else "RGB", draft)
        img.load()
    except ImageRejected:
        raise
    except Exception as exc:
        reason = (
            "truncated" if "truncated" in str(exc).lower() or isinstance(exc, (OSError, SyntaxError)) else "corrupt"
        )
        raise ImageRejected(reason, str(exc)) from None
    orientation = exif_orientation(img)
    try:
        rgb = to_rgb(img, background)
    except Exception as exc:  # a hostile palette or profile must cost its image, never the caller
        raise ImageRejected("corrupt", f"{img.mode}: {exc}") from None
    return (rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb), orientation


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation of a loaded image: 1 (as stored) when absent, out of range or unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns of damaged EXIF and reads what it can
            value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block costs its orientation, never the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``img`` as 8-bit RGB, as it is meant to be seen."""
    transparency = img.info.get("transparency")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _grey_to_8bit(img, transparency)
    elif img.mode == "CMYK":
        img = _cmyk_to_rgb(img)
    bands = img.getbands()
    if "A" in bands or "a" in bands or "transparency" in img.info or img.mode in ("P", "PA"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _grey_to_8bit(img: Image.Image, transparency: object) -> Image.Image:
    """16-bit (or 32-bit int, or float) grey to 8 bits by scaling, not by clipping."""
    values = np.asarray(img)
    if img.mode == "F":
        grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    else:
        wide = values.astype(np.int64)
        grey = np.clip((wide * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    out = Image.fromarray(grey, "L")
    if isinstance(transparency, int) and img.mode != "F":
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    return out


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    profile = img.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(img, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a damaged profile: the plain conversion below
    return img.convert("RGB")
