"""Pixels as the poster shows them: every decoded image is 8-bit RGB, scaled, composited, converted."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from postertune.imagefacts import image_facts
from postertune.imagesafe import ImageRejected, load_image


def png16(pixels: np.ndarray, colour_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot save every 16-bit mode)."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def pixels(data: bytes, **options: object) -> np.ndarray:
    img = load_image(data, **options)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_16_bit_grey_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    got = pixels(png16(ramp, 0))
    expected = np.round(ramp / 257).astype(int)
    assert np.abs(got[..., 0] - expected).max() <= 1
    assert (got[..., 0] == 255).mean() < 0.01  # clipping made almost every pixel 255
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_16_bit_colour_and_grey_with_transparency():
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[..., 0] = 40000
    assert pixels(png16(rgb, 2))[0, 0].tolist() == [156, 0, 0]

    grey = np.full((8, 8), 1000, np.uint16)
    grey[:4] = 5000
    got = pixels(png16(grey, 0, trns=struct.pack(">H", 5000)))  # grey 5000 is transparent
    assert got[0, 0].tolist() == [255, 255, 255] and got[7, 7].tolist() == [4, 4, 4]

    rgba = np.zeros((8, 8, 4), np.uint16)
    rgba[..., 0] = 65535  # red hidden under alpha 0
    assert pixels(png16(rgba, 6))[0, 0].tolist() == [255, 255, 255]


def test_transparency_is_composited_onto_the_background():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 255  # hidden green
    rgba[:4, :, 3] = 0
    rgba[4:, :, 3] = 128
    data = encode(Image.fromarray(rgba), "PNG")
    got = pixels(data)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert np.abs(got[7, 7] - [127, 255, 127]).max() <= 1
    assert pixels(data, background=(0, 0, 0))[0, 0].tolist() == [0, 0, 0]

    la = Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)))
    assert pixels(encode(la, "PNG"))[0, 0].tolist() == [255, 255, 255]
    webp = encode(Image.fromarray(rgba), "WEBP", lossless=True)
    assert pixels(webp)[0, 0].tolist() == [255, 255, 255]


def test_palette_images_expand_with_their_transparency():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.paste(1, (0, 4, 8, 8))
    plain = pixels(encode(palette, "PNG"))
    assert plain[0, 0].tolist() == [0, 0, 0] and plain[7, 7].tolist() == [200, 30, 40]
    for fmt in ("PNG", "GIF"):
        keyed = pixels(encode(palette, fmt, transparency=0))  # index 0 (black) is transparent
        assert keyed[0, 0].tolist() == [255, 255, 255], fmt
        assert keyed[7, 7].tolist() == [200, 30, 40], fmt


def test_cmyk_converts_to_the_colours_it_prints():
    rgb = Image.new("RGB", (16, 16), (220, 40, 30))
    rgb.paste((20, 60, 200), (0, 8, 16, 16))
    cmyk = rgb.convert("CMYK")
    tiff = pixels(encode(cmyk, "TIFF"))
    assert tiff[0, 0].tolist() == [220, 40, 30] and tiff[15, 15].tolist() == [20, 60, 200]
    jpeg = pixels(encode(cmyk, "JPEG", quality=95))
    assert np.abs(jpeg[2, 2] - [220, 40, 30]).max() <= 8 and np.abs(jpeg[13, 13] - [20, 60, 200]).max() <= 8
    info = image_facts(encode(cmyk, "JPEG"))
    assert (info.width, info.height, info.format) == (16, 16, "JPEG")


def test_a_damaged_image_is_a_reason_not_an_exception():
    rgba = encode(Image.new("RGBA", (64, 64), (1, 2, 3, 0)), "PNG")
    with pytest.raises(ImageRejected):
        load_image(rgba[: len(rgba) // 2])
