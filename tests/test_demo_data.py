"""The committed demo poster set: reproducible from its script, and covering every case it promises."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter

import imagehash
import pytest
from PIL import Image

from scripts.make_demo_data import DEFAULT_SEED, MIN_DESIGN_DISTANCE, write_demo_set
from tests.raw_tables import DEMO, demo_images, fetched_row

EXPECTED_CASES = {
    "exact_original": 1, "exact_duplicate": 2, "reencoded_original": 1, "near_duplicate_reencoded": 1,
    "resized_original": 1, "near_duplicate_resized": 1, "cropped_original": 1, "near_duplicate_cropped": 1,
    "four_by_five": 1, "square": 1, "dpi_at_minimum": 1, "tall_300dpi": 1, "no_overview": 1, "no_metadata": 1,
    "too_small": 1, "too_large": 1, "landscape": 1, "low_kb_per_pixel": 1, "low_dpi": 1, "gif_format": 1,
    "truncated": 1, "dead_link": 1,
}  # fmt: skip
GOOD_CASES = ["exact_original", "reencoded_original", "resized_original", "cropped_original", "four_by_five", "square",
              "dpi_at_minimum", "tall_300dpi", "no_overview", "no_metadata"]  # fmt: skip


def committed_files() -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (DEMO / "posters").iterdir()}
    files.update({name: (DEMO / name).read_bytes() for name in ("tmdb_posters.csv", "cases.csv")})
    return files


def test_regenerating_gives_identical_bytes(tmp_path):
    write_demo_set(tmp_path, DEFAULT_SEED)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "posters").iterdir()}
    fresh.update({name: (tmp_path / name).read_bytes() for name in ("tmdb_posters.csv", "cases.csv")})
    committed = committed_files()
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert not changed, f"regenerated files differ from the committed ones: {changed}"


def test_another_seed_gives_other_posters(tmp_path):
    write_demo_set(tmp_path, DEFAULT_SEED + 1)
    fresh = {hashlib.sha256(p.read_bytes()).digest() for p in (tmp_path / "posters").iterdir()}
    committed = {hashlib.sha256(data).digest() for data in committed_files().values()}
    assert not fresh & committed


def test_csv_has_the_tmdb_schema_and_every_case():
    with (DEMO / "tmdb_posters.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["id", "name", "overview", "genres", "poster_path"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(re.fullmatch(r"/[A-Za-z0-9]{27}\.(jpg|gif)", r["poster_path"]) for r in rows)
    assert Counter(meta["case"] for _, _, meta in demo_images()) == EXPECTED_CASES
    assert any(not r["overview"] for r in rows) and any(not r["genres"] for r in rows)
    assert all(r["name"] for r in rows)


def test_committed_set_is_small():
    unique = {hashlib.sha256(data).hexdigest(): len(data) for data in committed_files().values()}
    assert sum(unique.values()) < 3_000_000


def fetched_by_case() -> dict[str, list[dict]]:
    by_case: dict[str, list[dict]] = {}
    for position, (url, data, meta) in enumerate(demo_images()):
        by_case.setdefault(meta["case"], []).append(fetched_row(url, data, position))
    return by_case


def test_each_file_is_what_its_case_says():
    by_case = fetched_by_case()
    one = {case: rows[0] for case, rows in by_case.items()}
    assert one["truncated"]["reason"] == "truncated"
    assert one["dead_link"]["reason"] == "not_found"
    assert len({row["sha256"] for row in by_case["exact_duplicate"] + by_case["exact_original"]}) == 1
    assert min(one["too_small"]["width"], one["too_small"]["height"]) < 512
    assert max(one["too_large"]["width"], one["too_large"]["height"]) > 1024
    assert one["landscape"]["width"] > one["landscape"]["height"]
    assert one["low_dpi"]["dpi"] < 96 and one["dpi_at_minimum"]["dpi"] == 96
    assert one["gif_format"]["format"] == "GIF"
    low = one["low_kb_per_pixel"]
    assert low["bytes"] / 1024 / (low["width"] * low["height"]) < 0.0005
    for case in GOOD_CASES + ["low_dpi"]:
        row = one[case]
        assert 512 <= min(row["width"], row["height"]) and max(row["width"], row["height"]) <= 1024, case
        assert row["bytes"] / 1024 / (row["width"] * row["height"]) >= 0.0005, case
        assert row["format"] == "JPEG", case
    fetched = [row for rows in by_case.values() for row in rows if row["status"] == "ok"]
    assert sum(row["dpi"] is None for row in fetched) > len(fetched) / 2, "most posters carry no dpi, as on the web"


@pytest.mark.parametrize("kind", ["reencoded", "resized", "cropped"])
def test_near_duplicates_differ_in_bytes_and_pixels_but_not_in_look(kind):
    items = {meta["case"]: data for _, data, meta in demo_images()}
    original, copy = items[f"{kind}_original"], items[f"near_duplicate_{kind}"]
    with Image.open(io.BytesIO(original)) as first, Image.open(io.BytesIO(copy)) as second:
        assert first.size != second.size or first.tobytes() != second.tobytes()
        assert imagehash.phash(first) - imagehash.phash(second) < MIN_DESIGN_DISTANCE
