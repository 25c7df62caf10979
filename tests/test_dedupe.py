"""Dedupe: pHash robustness, the multi-index search against brute force, the keep rule,
greedy grouping, hashes from the fetch table (the same as decoding again), and the stage end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from postertune.dedupe.grouping import assign_duplicates, keep_priority
from postertune.dedupe.params import DedupeParams
from postertune.dedupe.run import mark_duplicates, run
from postertune.dedupe.search import (
    brute_force_pairs,
    choose_chunks,
    multi_index_pairs,
    near_pairs,
    search_cost,
)
from postertune.errors import PipelineError
from postertune.imagefacts import image_facts
from postertune.imagesafe import load_image
from postertune.params import ParamError, build
from postertune.store import ShardStore
from tests.raw_tables import PROJECT, demo_images, write_raw

DEFAULTS = DedupeParams()
DUPLICATE_CASES = {
    "exact_duplicate": "exact_original",
    "near_duplicate_reencoded": "reencoded_original",
    "near_duplicate_resized": "resized_original",
    "near_duplicate_cropped": "cropped_original",
}


def demo_posters() -> dict[str, bytes]:
    """Fetchable demo posters by case (the first file of each case)."""
    posters: dict[str, bytes] = {}
    for _, data, meta in demo_images():
        if data is not None and meta["case"] != "truncated":
            posters.setdefault(meta["case"], data)
    return posters


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copies(data: bytes) -> dict[str, bytes]:
    """Re-encoded, resized and slightly cropped copies, as reposted posters come."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    return {
        "quality 30": jpeg(img, 30),
        "resized to 60%": jpeg(img.resize((w * 3 // 5, h * 3 // 5), Image.Resampling.LANCZOS), 85),
        "upscaled to 130%": jpeg(img.resize((w * 13 // 10, h * 13 // 10), Image.Resampling.BICUBIC), 85),
        "cropped 2% per side": jpeg(img.crop((w // 50, h // 50, w - w // 50, h - h // 50)), 85),
        "cropped 4% off the bottom": jpeg(img.crop((0, 0, w, h - h // 25)), 85),
        "as PNG": (lambda b: (img.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
    }


def phash64(data: bytes) -> int:
    """The pHash fetch records for ``data``, as an integer."""
    return int(image_facts(data).phash, 16)


def hex64(value: int) -> str:
    return f"{value:016x}"


def decoded_again(data: bytes) -> str:
    """The pHash as dedupe computed it before fetch recorded it: its own decode of the stored
    bytes (JPEG draft mode to at least 64x64, upright, transparency on white), then imagehash."""
    return str(imagehash.phash(load_image(data, draft=(64, 64))))


# --- perceptual hash -------------------------------------------------------------------------


def test_phash_survives_reencoding_resizing_and_small_crops():
    for case, data in demo_posters().items():
        if case in DUPLICATE_CASES or case == "low_kb_per_pixel":  # a flat image's hash is mostly noise
            continue
        original = phash64(data)
        for name, copy in copies(data).items():
            distance = bin(original ^ phash64(copy)).count("1")
            assert distance <= DEFAULTS.max_distance, f"{case}, {name}: {distance} bits apart"


def test_different_demo_posters_are_far_apart():
    posters = {case: phash64(data) for case, data in demo_posters().items() if case not in DUPLICATE_CASES}
    cases = sorted(posters)
    closest = min(bin(posters[a] ^ posters[b]).count("1") for i, a in enumerate(cases) for b in cases[i + 1 :])
    assert closest > 2 * DEFAULTS.max_distance


def test_phash_hex_matches_imagehash_on_the_reduced_decode():
    for case, data in demo_posters().items():  # fetch decodes a colour JPEG's luma alone: the same hash
        assert hex64(phash64(data)) == decoded_again(data), case
    data = demo_posters()["square"]
    full = imagehash.phash(Image.open(io.BytesIO(data)))
    assert bin(int(str(full), 16) ^ phash64(data)).count("1") <= 4  # the reduced decode barely moves the hash


# --- neighbour search ------------------------------------------------------------------------


def planted_hashes(rng: np.random.Generator, count: int, max_flips: int) -> np.ndarray:
    """Random hashes plus copies of some of them with 0..max_flips random bits flipped."""
    base = rng.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)
    sources = rng.integers(0, count, count // 3)
    near = base[sources].copy()
    for k, flips in enumerate(rng.integers(0, max_flips + 1, len(near))):
        for bit in rng.choice(64, flips, replace=False):
            near[k] ^= np.uint64(1) << np.uint64(bit)
    return np.concatenate([base, near])


def as_set(pairs) -> set[tuple[int, int, int]]:
    return set(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.distance.tolist(), strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_multi_index_search_finds_exactly_the_brute_force_pairs(seed):
    rng = np.random.default_rng(seed)
    for max_distance in range(0, 15):
        hashes = planted_hashes(rng, 300, max_distance + 2)
        expected = as_set(brute_force_pairs(hashes, max_distance))
        assert any(d == max_distance for _, _, d in expected) or max_distance > 12
        for chunks in range(3, 9):
            found = as_set(multi_index_pairs(hashes, max_distance, chunks))
            assert found == expected, f"distance {max_distance}, {chunks} chunks"
        assert as_set(near_pairs(hashes, max_distance)) == expected


def test_multi_index_search_on_clustered_and_repeated_hashes():
    rng = np.random.default_rng(7)
    few_bits = rng.integers(0, 2**12, 600).astype(np.uint64) << np.uint64(20)  # big buckets
    repeated = np.repeat(rng.integers(0, 2**63, 5, dtype=np.uint64), 40)
    hashes = np.concatenate([few_bits, repeated])
    for max_distance in (0, 3, 8):
        expected = as_set(brute_force_pairs(hashes, max_distance))
        assert as_set(multi_index_pairs(hashes, max_distance, 4)) == expected


def test_indexed_search_at_scale_reports_each_brute_force_pair_once():
    # Enough hashes that near_pairs takes the index, with chunk buckets of several entries
    # and a pair's chunk keys differing in every bit position the probes flip.
    rng = np.random.default_rng(11)
    hashes = planted_hashes(rng, 6000, 12)
    max_distance = 10
    assert search_cost(len(hashes), choose_chunks(len(hashes), max_distance), max_distance) < len(hashes)
    expected = brute_force_pairs(hashes, max_distance)
    assert len(expected) > 1000
    assert as_set(near_pairs(hashes, max_distance)) == as_set(expected)
    for chunks in (3, 4, choose_chunks(len(hashes), max_distance)):
        found = multi_index_pairs(hashes, max_distance, chunks)
        assert len(found) == len(as_set(found)) == len(expected)
        assert as_set(found) == as_set(expected)


def test_search_handles_empty_and_single_inputs():
    for hashes in (np.array([], np.uint64), np.array([5], np.uint64)):
        assert len(near_pairs(hashes, 10)) == 0


# --- keep rule and grouping ------------------------------------------------------------------


def images_table(rows: list[tuple[int, int, int, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["width", "height", "bytes", "dpi"])


def test_keep_priority_largest_pixels_then_best_kb_per_pixel():
    images = images_table([(512, 768, 100_000, None), (600, 900, 90_000, None), (600, 900, 120_000, None)])
    assert keep_priority(images, ["pixels", "kb_per_pixel"]).tolist() == [2, 1, 0]
    assert keep_priority(images, ["kb_per_pixel"]).tolist() == [0, 2, 1]
    assert keep_priority(images, ["bytes", "pixels"]).tolist() == [2, 0, 1]


def test_keep_priority_ties_go_to_the_earlier_row_and_missing_dpi_ranks_last():
    images = images_table([(600, 900, 1000, None), (600, 900, 1000, 72.0), (600, 900, 1000, 300.0)])
    assert keep_priority(images, ["pixels"]).tolist() == [0, 1, 2]
    assert keep_priority(images, ["dpi"]).tolist() == [2, 1, 0]


def flip(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def test_greedy_assignment_does_not_chain_different_posters():
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = flip(a, *range(0, 6))  # 6 bits from a
    c = flip(b, *range(40, 46))  # 6 bits from b, 12 from a
    hashes = np.array([a, b, c], dtype=np.uint64)
    result = assign_duplicates(hashes, np.array([0, 1, 2]), max_distance=10)
    assert result.keeper.tolist() == [0, 0, 2]
    assert result.distance.tolist() == [0, 6, 0]
    # With b ranked first it claims both neighbours: each is within reach of b itself.
    result = assign_duplicates(hashes, np.array([1, 0, 2]), max_distance=10)
    assert result.keeper.tolist() == [1, 1, 1]


def test_identical_hashes_of_different_files_are_near_duplicates_at_distance_zero():
    hashes = np.array([7, 7, 7, 1 << 60], dtype=np.uint64)
    result = assign_duplicates(hashes, np.array([2, 0, 1, 3]), max_distance=0)
    assert result.keeper.tolist() == [2, 2, 2, 3]
    assert result.distance.tolist() == [0, 0, 0, 0]


def fetched(rows: list[tuple[str, int, int, int]]) -> pd.DataFrame:
    """Fetched rows (sha256, width, height, bytes) with urls in row order."""
    frame = pd.DataFrame(rows, columns=["sha256", "width", "height", "bytes"])
    return frame.assign(url=[f"https://example.org/{i}.jpg" for i in range(len(rows))], dpi=None, status="ok")


def test_exact_and_near_duplicates_point_at_the_kept_image():
    base = 0x1234_5678_9ABC_DEF0
    rows = fetched([("s", 512, 768, 200_000), ("big", 600, 900, 250_000), ("s", 512, 768, 200_000),
                    ("other", 512, 768, 200_000), ("other", 512, 768, 200_000)])  # fmt: skip
    hashes = {"s": flip(base, 3, 9), "big": base, "other": ~base & (2**64 - 1)}
    marked = mark_duplicates(rows, hashes, DEFAULTS)
    assert marked["dedupe_status"].tolist() == [
        "near_duplicate", "kept", "exact_duplicate", "kept", "exact_duplicate",
    ]  # fmt: skip
    assert marked["duplicate_of"].fillna("-").tolist() == ["big", "-", "big", "-", "other"]
    assert marked["dedupe_distance"].tolist() == [2, 0, 2, 0, 0]


def test_keep_order_param_changes_the_kept_copy():
    rows = fetched([("small_sharp", 512, 768, 260_000), ("large_soft", 600, 900, 60_000)])
    hashes = {"small_sharp": 99, "large_soft": flip(99, 1)}
    by_pixels = mark_duplicates(rows, hashes, DEFAULTS)
    assert by_pixels["dedupe_status"].tolist() == ["near_duplicate", "kept"]
    by_density = mark_duplicates(rows, hashes, DedupeParams(keep_order=("kb_per_pixel", "pixels")))
    assert by_density["dedupe_status"].tolist() == ["kept", "near_duplicate"]


# --- params ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"max_distance": 32}, "dedupe.max_distance"),
        ({"max_distance": -1}, "dedupe.max_distance"),
        ({"max_distance": 4.5}, "dedupe.max_distance"),
        ({"keep_order": []}, "dedupe.keep_order"),
        ({"keep_order": ["pixels", "pixels"]}, "dedupe.keep_order"),
        ({"keep_order": ["pixels", "sharpness"]}, "dedupe.keep_order[1]"),
        ({"threshold": 8}, "dedupe.threshold"),
    ],
)
def test_bad_params_name_the_parameter(values, name):
    with pytest.raises(ParamError) as error:
        build(DedupeParams, values, "dedupe")
    assert error.value.name == name
    assert "\n" not in str(error.value)


def test_committed_params_are_valid():
    committed = yaml.safe_load((PROJECT / "params.yaml").read_text())["dedupe"]
    params = build(DedupeParams, committed, "dedupe")
    loaded = {key: str(v) if isinstance(v := getattr(params, key), Path) else v for key in committed}
    assert loaded == {key: tuple(v) if isinstance(v, list) else v for key, v in committed.items()}


# --- the table and the stage -----------------------------------------------------------------


def stage_paths(root: Path) -> dict[str, Path]:
    """The dedupe params' paths, under a test folder."""
    return dict(table=root / "data/raw/images.parquet", shards=root / "data/raw/shards", output=root / "data/dedup")


def test_demo_set_groups_exactly_the_planted_duplicates(tmp_path):
    items = demo_images()
    write_raw(tmp_path, items)
    params = DedupeParams(**stage_paths(tmp_path))
    metrics = run(params)
    marked = pd.read_parquet(params.output / "images.parquet")
    case_of = {url: meta["case"] for url, _, meta in items}
    sha_of_case = dict(zip(marked["url"].map(case_of), marked["sha256"], strict=True))
    for url, status, duplicate_of in zip(marked["url"], marked["dedupe_status"], marked["duplicate_of"], strict=True):
        case = case_of[url]
        if case in DUPLICATE_CASES:
            assert status != "kept", case
            assert duplicate_of == sha_of_case[DUPLICATE_CASES[case]], case
        else:
            assert status == "kept", case  # no two different posters merged
    assert metrics["images_in"] == len(marked) == 21
    assert metrics["failed_fetch_rows_skipped"] == 2
    assert metrics["exact_duplicates_removed"] == 2
    assert metrics["near_duplicates_removed"] == 3
    assert metrics["kept"] == 16
    groups = pd.read_csv(params.output / "groups.csv")
    assert list(groups.columns) == [
        "group",
        "kept_sha256",
        "member_sha256",
        "status",
        "distance",
        "width",
        "height",
        "url",
    ]
    assert groups["group"].nunique() == metrics["duplicate_groups"] == 4
    assert (groups.groupby("group")["status"].first() == "kept").all()


def test_fetch_time_hashes_are_the_hashes_of_decoding_the_stored_bytes_again():
    posters = demo_posters()
    blobs = dict(posters)
    blobs |= {
        f"{case}, {name}": copy for case in ("square", "tall_300dpi") for name, copy in copies(posters[case]).items()
    }
    for name, data in blobs.items():
        assert image_facts(data).phash == decoded_again(data), name


def test_groups_from_fetch_time_hashes_equal_groups_from_decoding_again(tmp_path):
    posters = demo_posters()
    copied = [
        (f"file:copies/{case}/{name}", copy, {"case": f"{case} copy"})
        for case in ("square", "tall_300dpi", "reencoded_original")
        for name, copy in copies(posters[case]).items()
    ]
    write_raw(tmp_path, demo_images() + copied)
    params = DedupeParams(**stage_paths(tmp_path))
    run(params)
    marked = pd.read_parquet(params.output / "images.parquet")

    fetched = pd.read_parquet(params.table)
    rows = fetched[fetched["status"] == "ok"].reset_index(drop=True)
    with ShardStore(params.shards) as store:
        again = {sha: int(decoded_again(store.read(sha)), 16) for sha in rows["sha256"]}
    expected = mark_duplicates(rows, again, params)
    columns = ["url", "dedupe_status", "duplicate_of", "dedupe_distance"]
    pd.testing.assert_frame_equal(marked[columns], expected[columns])
    assert (marked["dedupe_status"] == "near_duplicate").sum() == 3 + len(copied)  # every copy found


def test_a_fetch_table_without_hashes_is_refused_naming_the_file_and_column(tmp_path):
    frame = write_raw(tmp_path, demo_images()[:3])
    params = DedupeParams(**stage_paths(tmp_path))
    frame.drop(columns="phash").to_parquet(params.table)  # a table from before fetch recorded hashes
    with pytest.raises(PipelineError) as error:
        run(params)
    assert str(error.value) == f"{params.table}: missing column 'phash' (run the fetch stage again)"
    frame.assign(phash=frame["phash"].where(frame.index != 1, None)).to_parquet(params.table)
    with pytest.raises(PipelineError, match=r"row 1 has status ok but no sha256 or .* or phash$"):
        run(params)


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env, capture_output=True, text=True)


def write_params(cwd: Path, **dedupe) -> None:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["dedupe"].update(dedupe)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_stage_end_to_end_then_rerun_with_a_new_threshold(tmp_path):
    write_raw(tmp_path, demo_images())
    write_params(tmp_path)
    first = run_stage("dedupe", tmp_path)
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "metrics/dedupe.json").read_text())
    assert metrics["unique_images"] == 19 and metrics["near_duplicates_removed"] == 3
    marked = pd.read_parquet(tmp_path / "data/dedup/images.parquet")
    assert set(marked["dedupe_status"]) == {"kept", "exact_duplicate", "near_duplicate"}
    assert marked["phash"].str.fullmatch(r"[0-9a-f]{16}").all()

    write_params(tmp_path, max_distance=0)
    second = run_stage("dedupe", tmp_path)
    assert second.returncode == 0, second.stderr
    metrics = json.loads((tmp_path / "metrics/dedupe.json").read_text())
    rerun = pd.read_parquet(tmp_path / "data/dedup/images.parquet")
    assert rerun["phash"].tolist() == marked["phash"].tolist()
    assert metrics["near_duplicates_removed"] == 2  # the cropped copy is 6 bits away


@pytest.mark.slow
def test_stage_reports_bad_params_and_inputs_in_one_line(tmp_path):
    write_params(tmp_path, max_distance=40)
    bad = run_stage("dedupe", tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("dedupe: error: param dedupe.max_distance:")

    write_params(tmp_path)
    missing = run_stage("dedupe", tmp_path)
    assert missing.returncode == 2
    assert (
        missing.stderr.strip() == "dedupe: error: data/raw/images.parquet: file not found (run the fetch stage first)"
    )


def test_an_image_missing_from_the_store_is_named_with_its_url(tmp_path):
    frame = write_raw(tmp_path, demo_images()[:3])
    (tmp_path / "data/raw/shards").rename(tmp_path / "elsewhere")
    with pytest.raises(PipelineError, match=frame["url"][0]):
        run(replace(DEFAULTS, **stage_paths(tmp_path)))
