"""Draw the synthetic demo poster set: ``data/demo/posters/`` and ``data/demo/tmdb_posters.csv``.

Every poster is drawn here with Pillow (a gradient, a few shapes, a title, film grain),
so the set holds no third-party images, and the same seed gives the same bytes.

The set is built so that every dedupe and filter rule fires once in ``dvc repro``:
exact duplicates (one poster's bytes under three poster paths), near duplicates (a poster
re-encoded at a low JPEG quality, one resized, one slightly cropped), and one poster per
filter rule: too small, too large, a landscape aspect, too few KB per pixel, a low dpi,
a GIF. A truncated JPEG and a row whose file does not exist exercise the fetch stage.
Most posters carry no dpi metadata, as on the web; some rows have no overview or genres.

Good posters are saved at the lowest JPEG quality whose file size still clears the
guide's 0.0005 KB/pixel floor by a small margin, to keep the committed set small.

    python -m scripts.make_demo_data [--out data/demo] [--seed 7]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from postertune.atomic import write_bytes, write_text

DEFAULT_OUT = Path("data/demo")
DEFAULT_SEED = 7
GOOD_KB_PER_PIXEL = 0.00052
# Distinct designs are redrawn until their pHash differs from every earlier design by at
# least this much, far above the dedupe threshold, so different posters never merge.
MIN_DESIGN_DISTANCE = 22
GRAIN = 10.0

GENRES = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Drama", "Fantasy", "Horror", "Mystery", "Romance"]
GENRES += ["Science Fiction", "Thriller", "Western", "Documentary", "Family", "Music", "War", "History"]
TITLE_WORDS_A = ["Neon", "Silent", "Crimson", "Last", "Hollow", "Golden", "Broken", "Midnight", "Paper", "Iron"]
TITLE_WORDS_A += ["Velvet", "Distant", "Electric", "Frozen", "Wild", "Secret", "Burning", "Quiet", "Lost", "Glass"]
TITLE_WORDS_B = ["Tides", "Harbor", "Orchard", "Signal", "Empire", "Garden", "Frontier", "Kingdom", "Echoes", "River"]
TITLE_WORDS_B += [
    "Letters",
    "Station",
    "Horizon",
    "Lanterns",
    "Machine",
    "Summer",
    "Witness",
    "Canyon",
    "Choir",
    "Moon",
]
PLACES = ["a coastal town", "a desert outpost", "a city that never sleeps", "a mountain village", "deep space"]
PEOPLE = [
    "a retired detective",
    "two estranged sisters",
    "a young inventor",
    "a travelling band",
    "an old lighthouse keeper",
]
EVENTS = [
    "a storm cuts every road",
    "a letter arrives forty years late",
    "the power fails for a week",
    "a stranger wins",
]


@dataclass(frozen=True)
class Design:
    """One distinct poster design and how its file is encoded."""

    key: str
    width: int
    height: int
    dpi: float | None = None
    grain: float = GRAIN
    kb_per_pixel: float | None = GOOD_KB_PER_PIXEL  # lowest quality that reaches it; None: ``quality``
    quality: int = 85
    fmt: str = "JPEG"
    flat: bool = False
    overview: bool = True
    genres: bool = True


DESIGNS = [
    Design("exact_original", 512, 768),
    Design("reencoded_original", 512, 768),
    Design("resized_original", 600, 900),
    Design("cropped_original", 544, 816, dpi=300.0),
    Design("four_by_five", 512, 640),
    Design("square", 576, 576),
    Design("dpi_at_minimum", 512, 768, dpi=96.0),
    Design("tall_300dpi", 576, 864, dpi=300.0),
    Design("no_overview", 512, 768, overview=False),
    Design("no_metadata", 528, 792, overview=False, genres=False),
    Design("too_small", 400, 600, grain=0, kb_per_pixel=None),
    Design("too_large", 1100, 1650, grain=0, kb_per_pixel=None, quality=70),
    Design("landscape", 1024, 640, grain=0, kb_per_pixel=None),
    Design("low_kb_per_pixel", 600, 900, grain=0, kb_per_pixel=None, quality=15, flat=True),
    Design("low_dpi", 512, 768, dpi=72.0),
    Design("gif_format", 512, 768, grain=0, kb_per_pixel=None, fmt="GIF"),
    Design("truncated", 512, 768, grain=0, kb_per_pixel=None),
]


def random_color(rnd: random.Random) -> tuple[int, int, int]:
    return (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))


def draw_poster(
    seed: int, width: int, height: int, title: str, grain: float = GRAIN, flat: bool = False
) -> Image.Image:
    """A synthetic poster: gradient background, a few large shapes, a title, optional grain."""
    rnd = random.Random(seed)
    angle = rnd.uniform(0, 2 * math.pi)
    top, bottom = np.array(random_color(rnd), float), np.array(random_color(rnd), float)
    if flat:
        bottom = top + rnd.choice([-1, 1]) * 6.0
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-9)
    background = np.clip(top + (bottom - top) * ramp[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(background, "RGB")
    if flat:
        return img
    draw = ImageDraw.Draw(img)
    for _ in range(rnd.randint(3, 6)):
        x0, y0, size = rnd.uniform(-0.2, 0.9) * width, rnd.uniform(-0.1, 0.9) * height, rnd.uniform(0.2, 0.6) * width
        kind, fill = rnd.choice("ert"), random_color(rnd)
        if kind == "e":
            draw.ellipse([x0, y0, x0 + size, y0 + size * rnd.uniform(0.6, 1.4)], fill=fill)
        elif kind == "r":
            draw.rectangle([x0, y0, x0 + size, y0 + size * rnd.uniform(0.3, 1.5)], fill=fill)
        else:
            draw.polygon([(x0, y0 + size), (x0 + size / 2, y0), (x0 + size, y0 + size)], fill=fill)
    short_side = min(width, height)
    font = ImageFont.load_default(size=max(12, int(short_side * 0.11)))
    lines = "\n".join(title.upper().split(" ", 1))
    draw.multiline_text(
        (width * 0.07, rnd.uniform(0.05, 0.6) * height), lines, font=font, fill=random_color(rnd),
        stroke_width=max(1, short_side // 200), stroke_fill=(0, 0, 0), spacing=short_side // 40,
    )  # fmt: skip
    small = ImageFont.load_default(size=max(8, short_side // 28))
    draw.text((width * 0.07, height * 0.93), "IN CINEMAS SOON", font=small, fill=(235, 235, 235))
    if grain:
        noise = np.random.default_rng(seed).normal(0.0, grain, (height, width, 1))
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8), "RGB")
    return img


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 85, dpi: float | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "GIF":
        img.quantize(colors=32, dither=Image.Dither.NONE).save(buf, "GIF")
    else:
        extra = {"dpi": (dpi, dpi)} if dpi is not None else {}
        img.save(buf, fmt, quality=quality, **extra)
    return buf.getvalue()


def encode_at_kb_per_pixel(img: Image.Image, target: float, dpi: float | None) -> bytes:
    for quality in range(80, 99):
        data = encode(img, quality=quality, dpi=dpi)
        if len(data) / 1024 / (img.width * img.height) >= target:
            return data
    raise ValueError(f"cannot reach {target} KB/pixel for a {img.width}x{img.height} poster")


def poster_token(rnd: random.Random) -> str:
    return "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(27))


def overview_text(rnd: random.Random) -> str:
    return f"In {rnd.choice(PLACES)}, {rnd.choice(PEOPLE)} must decide what matters when {rnd.choice(EVENTS)}."


def build_demo_set(seed: int = DEFAULT_SEED) -> tuple[dict[str, bytes], list[dict[str, str]]]:
    """Return ``{file name: bytes}`` and the CSV rows, with a ``case`` per row naming what it exercises."""
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    rows: list[dict[str, str]] = []
    accepted: list[imagehash.ImageHash] = []

    def add_row(case: str, data: bytes | None, ext: str, title: str, overview: str, genres: str) -> None:
        name = f"{poster_token(rnd)}.{ext}"
        if data is not None:
            files[name] = data
        movie_id = str(rnd.randrange(10_000, 999_999))
        rows.append({"id": movie_id, "name": title, "overview": overview, "genres": genres,
                     "poster_path": f"/{name}", "case": case})  # fmt: skip

    for index, design in enumerate(DESIGNS):
        title = f"{rnd.choice(TITLE_WORDS_A)} {rnd.choice(TITLE_WORDS_B)}"
        for attempt in range(1000):
            img = draw_poster(seed * 100_000 + index * 1000 + attempt, design.width, design.height, title,
                              grain=design.grain, flat=design.flat)  # fmt: skip
            phash = imagehash.phash(img)
            if all(phash - other >= MIN_DESIGN_DISTANCE for other in accepted):
                break
        else:
            raise RuntimeError(f"no distinct design found for {design.key}")
        accepted.append(phash)
        if design.kb_per_pixel is not None:
            data = encode_at_kb_per_pixel(img, design.kb_per_pixel, design.dpi)
        else:
            data = encode(img, design.fmt, design.quality, design.dpi)
        if design.key == "truncated":
            data = data[: len(data) * 55 // 100]
        overview = overview_text(rnd) if design.overview else ""
        genres = ", ".join(rnd.sample(GENRES, rnd.randint(1, 3))) if design.genres else ""
        add_row(design.key, data, "gif" if design.fmt == "GIF" else "jpg", title, overview, genres)
        meta = (title, overview, genres)
        if design.key == "exact_original":
            add_row("exact_duplicate", data, "jpg", *meta)
            add_row("exact_duplicate", data, "jpg", *meta)
        elif design.key == "reencoded_original":
            add_row("near_duplicate_reencoded", encode(img, quality=40), "jpg", *meta)
        elif design.key == "resized_original":
            smaller = img.resize((img.width * 4 // 5, img.height * 4 // 5), Image.Resampling.LANCZOS)
            add_row("near_duplicate_resized", encode(smaller, quality=80), "jpg", *meta)
        elif design.key == "cropped_original":
            dx, dy = img.width * 3 // 100, img.height * 3 // 100
            cropped = img.crop((dx, dy, img.width - dx, img.height - dy))
            add_row("near_duplicate_cropped", encode(cropped, quality=85, dpi=design.dpi), "jpg", *meta)
    add_row("dead_link", None, "jpg", "Missing Reel", overview_text(rnd), "Drama")
    return files, rows


def write_demo_set(out: Path, seed: int = DEFAULT_SEED) -> None:
    files, rows = build_demo_set(seed)
    posters = out / "posters"
    for stale in posters.glob("*") if posters.is_dir() else []:
        if stale.name not in files:
            stale.unlink()
    for name, data in files.items():
        write_bytes(posters / name, data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "name", "overview", "genres", "poster_path"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: v for k, v in row.items() if k != "case"} for row in rows)
    write_text(out / "tmdb_posters.csv", buf.getvalue())
    cases = "".join(f"{row['poster_path']},{row['case']}\n" for row in rows)
    write_text(out / "cases.csv", "poster_path,case\n" + cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    write_demo_set(args.out, args.seed)


if __name__ == "__main__":
    main()
