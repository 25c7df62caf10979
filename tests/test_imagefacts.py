"""One decode per image: the reduced-scale decode that verifies a fetched image refuses
exactly what a full decode refuses, and measures what later stages need (size, dpi,
JPEG quality, pHash) without decoding again."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from postertune.imagefacts import image_facts
from postertune.imagesafe import ImageRejected, load_image
from tests.test_fetch import bomb_png, poster

MAX_PIXELS = 4_000_000  # the bomb is 3000x3000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def overwrite(data: bytes, at: int, junk: bytes) -> bytes:
    return data[:at] + junk + data[at + len(junk) :]


def fault_corpus() -> dict[str, bytes]:
    """The fetch stage's faults (a truncated JPEG, an HTML page, an empty body, a
    decompression bomb) and more ways a poster arrives broken."""
    small = poster(2)
    big = poster(3, (600, 900))
    pixels = Image.open(io.BytesIO(big)).convert("RGB")
    progressive = encode(pixels, "JPEG", quality=85, progressive=True)
    png, webp = encode(pixels, "PNG"), encode(pixels, "WEBP", quality=80)
    noise = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    return {
        "JPEG cut at 2/3 (the fetch test's)": small[: len(small) * 2 // 3],
        "JPEG cut inside the header": big[:600],
        "JPEG cut at 1/3": big[: len(big) // 3],
        "JPEG cut at 90%": big[: len(big) * 9 // 10],
        "JPEG without its end marker": big[:-2],
        "progressive JPEG cut at 2/3": progressive[: len(progressive) * 2 // 3],
        "progressive JPEG cut at 95%": progressive[: len(progressive) * 19 // 20],
        "JPEG scan overwritten with 0xff": overwrite(big, len(big) // 2, b"\xff" * 64),
        "JPEG scan overwritten with noise": overwrite(big, len(big) // 2, noise),
        "JPEG marker then noise": b"\xff\xd8\xff" + noise,
        "PNG cut in half": png[: len(png) // 2],
        "PNG with a damaged chunk": overwrite(png, len(png) // 2, b"\0" * 16),
        "WEBP cut in half": webp[: len(webp) // 2],
        "HTML error page": b"<!doctype html><html><body>Not found</body></html>",
        "empty body": b"",
        "decompression bomb": bomb_png(),
        "intact JPEG": big,
        "intact progressive JPEG": progressive,
    }


def verdict(check, data: bytes) -> str:
    try:
        check(data)
    except ImageRejected as exc:
        return exc.reason
    return "ok"


@pytest.mark.parametrize("case", list(fault_corpus()))
def test_the_reduced_decode_refuses_what_a_full_decode_refuses_for_the_same_reason(case):
    data = fault_corpus()[case]
    full = verdict(lambda d: load_image(d, MAX_PIXELS), data)  # every pixel at full scale
    assert verdict(lambda d: image_facts(d, MAX_PIXELS), data) == full


def test_the_fetch_fault_corpus_keeps_its_reasons():
    corpus = fault_corpus()
    reasons = {case: verdict(lambda d: image_facts(d, MAX_PIXELS), corpus[case]) for case in corpus}
    assert reasons["JPEG cut at 2/3 (the fetch test's)"] == "truncated"
    assert reasons["HTML error page"] == "not_an_image"
    assert reasons["empty body"] == "empty"
    assert reasons["decompression bomb"] == "decompression_bomb"
    assert reasons["intact JPEG"] == reasons["intact progressive JPEG"] == "ok"
    cut = [case for case in corpus if " cut " in case or "without its end" in case]
    assert {reasons[case] for case in cut} <= {"truncated", "not_an_image"}


def test_facts_of_one_decode():
    pixels = Image.open(io.BytesIO(poster(4, (120, 180)))).convert("RGB")
    for quality in (35, 75, 95):
        facts = image_facts(encode(pixels, "JPEG", quality=quality, dpi=(300, 300)))
        assert (facts.width, facts.height, facts.format, facts.dpi) == (120, 180, "JPEG", 300.0)
        assert facts.jpeg_quality == quality  # libjpeg's own tables give their quality back
    png = image_facts(encode(pixels, "PNG"))
    assert (png.format, png.jpeg_quality, png.dpi) == ("PNG", None, None)
    jpeg = image_facts(encode(pixels, "JPEG", quality=95)).phash
    other = image_facts(poster(5, (120, 180))).phash
    assert bits_apart(png.phash, jpeg) <= 10 < bits_apart(png.phash, other)  # dedupe.max_distance: 10


def bits_apart(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")
