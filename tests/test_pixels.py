"""Pixels as the poster shows them, in every stage: upright by EXIF orientation (recorded
sizes, loaded pixels, pHash), and transparency on the background colour the params name."""

from __future__ import annotations

import io
from dataclasses import replace

import imagehash
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from postertune.caption.params import CaptionParams
from postertune.caption.run import cache_settings, caption_images
from postertune.dedupe.params import DedupeParams
from postertune.dedupe.run import run as dedupe
from postertune.evaluate.cmmd import reference_loader
from postertune.evaluate.params import EvaluateParams
from postertune.fetch.journal import Journal, Remeasure, StoredImage
from postertune.fetch.params import FetchParams
from postertune.fetch.run import run as fetch
from postertune.imagefacts import image_facts, recipe
from postertune.imagesafe import exif_orientation, load_image
from postertune.params import ParamError, build
from postertune.store import ShardStore, ShardWriter, sha256_hex
from postertune.train.buckets import Bucket, Crop
from postertune.train.latent_cache import LatentEntry, pixels_of
from postertune.train.params import TrainParams
from tests.raw_tables import write_raw
from tests.test_fetch import FAST, poster

WIDTH, HEIGHT = 48, 80  # the upright (displayed) size: a portrait
QUADRANTS = {"top left": (220, 30, 30), "top right": (30, 200, 40), "bottom left": (40, 60, 210), "bottom right": (240, 220, 40)}  # fmt: skip


def upright() -> np.ndarray:
    """A portrait whose four quadrants have four colours, so every flip and turn shows."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    h, w = HEIGHT // 2, WIDTH // 2
    for name, colour in QUADRANTS.items():
        rows = slice(0, h) if name.startswith("top") else slice(h, None)
        cols = slice(0, w) if name.endswith("left") else slice(w, None)
        image[rows, cols] = colour
    return image


def stored_as(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores with EXIF ``orientation``, written from the EXIF definition
    (where the stored 0th row and 0th column lie in the displayed image), not from Pillow."""
    d = displayed
    return {
        1: d,  # 0th row at the top, 0th column at the left
        2: d[:, ::-1],  # top, right
        3: d[::-1, ::-1],  # bottom, right
        4: d[::-1],  # bottom, left
        5: d.transpose(1, 0, 2),  # left, top
        6: np.rot90(d, 1),  # right, top
        7: d[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
        8: np.rot90(d, -1),  # left, bottom
    }[orientation].copy()


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(pixels).save(out, fmt, exif=exif, **options)
    return out.getvalue()


ORIENTATIONS = range(1, 9)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_each_exif_orientation_loads_upright_and_records_the_displayed_size(orientation, fmt):
    data = with_orientation(stored_as(upright(), orientation), orientation, fmt)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == ((HEIGHT, WIDTH) if orientation >= 5 else (WIDTH, HEIGHT))  # the file really is turned
    assert exif_orientation(stored) == orientation

    info = image_facts(data)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    image = load_image(data)
    assert image.size == (WIDTH, HEIGHT)
    got = np.asarray(image).astype(int)
    if fmt == "PNG":
        assert (got == upright()).all()
    else:  # lossy: each quadrant's centre keeps its colour
        for name, colour in QUADRANTS.items():
            y = HEIGHT // 4 if name.startswith("top") else 3 * HEIGHT // 4
            x = WIDTH // 4 if name.endswith("left") else 3 * WIDTH // 4
            assert np.abs(got[y, x] - colour).max() <= 12, name
    if fmt == "JPEG":  # the reduced (draft) decode that captioning and the pHash use turns the same way
        small = load_image(data, draft=(WIDTH // 4, HEIGHT // 4))
        assert small.width < small.height


def test_a_damaged_or_odd_orientation_leaves_the_image_as_stored():
    for value in (0, 9, 65535):
        data = with_orientation(upright(), value, "PNG")
        assert load_image(data).size == (WIDTH, HEIGHT) and (np.asarray(load_image(data)) == upright()).all()
    jpeg = with_orientation(upright(), 6, "JPEG")
    start = jpeg.index(b"Exif\0\0")
    damaged = jpeg[: start + 10] + b"\xff" * 8 + jpeg[start + 18 :]  # the TIFF header of the EXIF block
    assert load_image(damaged).size in ((WIDTH, HEIGHT), (HEIGHT, WIDTH))


def fetch_camera_folder(tmp_path, **overrides) -> tuple[pd.DataFrame, dict]:
    folder = tmp_path / "sources" / "camera"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for orientation in ORIENTATIONS:
            (folder / f"o{orientation}.jpg").write_bytes(with_orientation(stored_as(upright(), orientation), orientation, "JPEG"))  # fmt: skip
    raw = {"sources": [{"name": "camera", "kind": "folder", "path": str(folder)}], "source_dir": str(tmp_path / "sources")}  # fmt: skip
    params = build(FetchParams, raw | FAST | {"allowed_schemes": []} | overrides, "fetch")
    metrics = fetch(replace(params, shards=tmp_path / "shards", table=tmp_path / "images.parquet"))
    return pd.read_parquet(tmp_path / "images.parquet"), metrics


def test_fetch_records_every_orientation_as_displayed(tmp_path):
    table, _ = fetch_camera_folder(tmp_path)
    assert table["status"].tolist() == ["ok"] * 8
    assert set(zip(table["width"], table["height"], strict=True)) == {(WIDTH, HEIGHT)}
    assert table["phash"].nunique() == 1  # every copy hashes upright


def test_images_journalled_under_another_recipe_are_measured_again_from_the_store(tmp_path):
    first, _ = fetch_camera_folder(tmp_path)
    for segment in Journal(tmp_path / "shards", recipe()).segments():  # as written before the recipe was recorded
        pd.read_parquet(segment).drop(columns=["recipe", "phash", "jpeg_quality"]).to_parquet(segment)
    again, metrics = fetch_camera_folder(tmp_path)
    assert metrics["run"]["urls_remeasured"] == 8 and metrics["run"]["urls_fetched"] == 0
    pd.testing.assert_frame_equal(again, first)
    _, metrics = fetch_camera_folder(tmp_path)  # measured again once, then reused
    assert metrics["run"]["urls_reused"] == 8 and metrics["run"]["urls_remeasured"] == 0


def test_a_journal_entry_is_current_only_under_its_own_recipe(tmp_path):
    image = StoredImage("file:o6.jpg", "ab" * 32, WIDTH, HEIGHT, "JPEG", None, 90, "0" * 16, 1000)
    Journal(tmp_path, recipe()).append([image])
    assert Journal(tmp_path, recipe()).load({image.sha256}) == ({image.url: image}, {})
    assert Journal(tmp_path, recipe(BLACK)).load({image.sha256}) == ({}, {image.url: Remeasure(image.sha256, "")})
    assert Journal(tmp_path, recipe()).load(set()) == ({}, {})  # its shard was never published


def test_dedupe_groups_a_copy_turned_by_exif_with_its_upright_twin(tmp_path):
    twin = np.asarray(Image.open(io.BytesIO(poster(5, (96, 144)))))
    other = np.asarray(Image.open(io.BytesIO(poster(6, (96, 144)))))
    sideways = with_orientation(stored_as(twin, 6), 6, "JPEG")
    plain = Image.open(io.BytesIO(sideways)).convert("L").resize((32, 32))  # the stored pixels, never turned
    assert imagehash.phash(plain) - imagehash.phash(Image.fromarray(twin)) > DedupeParams().max_distance
    images = [
        ("file:upright.jpg", with_orientation(twin, 1, "JPEG"), {}),
        ("file:other.jpg", with_orientation(other, 1, "JPEG"), {}),
        ("file:sideways.jpg", sideways, {}),
    ]
    write_raw(tmp_path, images)
    paths = dict(table=tmp_path / "data/raw/images.parquet", shards=tmp_path / "data/raw/shards")
    dedupe(replace(DedupeParams(), output=tmp_path / "data/dedup", **paths))
    marked = pd.read_parquet(tmp_path / "data/dedup/images.parquet").set_index("url")
    twins = marked.loc[["file:upright.jpg", "file:sideways.jpg"]]
    assert sorted(twins["dedupe_status"]) == ["kept", "near_duplicate"]
    assert twins["duplicate_of"].nunique() == 1  # one group: both point at the kept copy
    assert marked.loc["file:other.jpg", "dedupe_status"] == "kept"


# --- the background colour ----------------------------------------------------------------------

BLACK = (0, 0, 0)


def half_transparent() -> bytes:
    """A poster whose top half is fully transparent over hidden green."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[32:, :, 0] = 200
    rgba[32:, :, 3] = 255
    rgba[:32, :, 3] = 0
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def store(tmp_path) -> tuple[ShardStore, str]:
    data = half_transparent()
    with ShardWriter(tmp_path / "shards", max_images=4) as writer:
        writer.add(sha256_hex(data), data)
    return ShardStore(tmp_path / "shards"), sha256_hex(data)


def test_background_is_a_param_of_every_stage_that_reads_pixels():
    source = {"sources": [{"name": "demo", "kind": "folder", "path": "data/demo/posters"}]}
    for cls, name, path, required in [
        (FetchParams, "fetch", ("background",), source),
        (CaptionParams, "caption", ("background",), {}),
        (TrainParams, "train", ("background",), {}),
        (EvaluateParams, "evaluate", ("cmmd", "background"), {}),
    ]:
        section: dict = dict(required)
        inner = section
        for key in path[:-1]:
            inner = inner.setdefault(key, {})
        inner[path[-1]] = [0, 0, 0]
        params = build(cls, section, name)
        value = params
        for key in path:
            value = getattr(value, key)
        assert value == BLACK
        dotted = ".".join((name, *path))
        inner[path[-1]] = [0, 0]
        with pytest.raises(ParamError, match=rf"^param {dotted}: must have 3 items, got \[0, 0\]$"):
            build(cls, section, name)
        inner[path[-1]] = [0, 0, 256]
        with pytest.raises(ParamError, match=rf"^param {dotted}\[2\]: must be at least 0 and at most 255, got 256$"):
            build(cls, section, name)


def test_the_background_changes_the_captioners_input_and_their_cache(store):
    store, sha = store
    seen: dict[tuple, np.ndarray] = {}

    class Recorder:
        name, batch_size, image_size = "recorder", 4, 32

        def __init__(self, background):
            self.background = background

        def caption(self, shas, images):
            seen[self.background] = np.asarray(images[0])
            return []

    for background in ((255, 255, 255), BLACK):
        params = build(CaptionParams, {"background": list(background), "workers": 1}, "caption")

        class Cache:  # what caption_images needs of a cache
            records: dict = {}

            def __contains__(self, key):
                return False

            def add(self, records):
                pass

            def compact(self):
                pass

        caption_images(lambda b=background: Recorder(b), Cache(), [sha], store, params)
    assert seen[(255, 255, 255)][0, 0].tolist() == [255, 255, 255] and seen[BLACK][0, 0].tolist() == [0, 0, 0]
    assert seen[BLACK][-1, -1].tolist() == [200, 255, 0]  # the opaque half is the same on any background
    white, black = (build(CaptionParams, {"background": list(b)}, "caption") for b in ((255, 255, 255), BLACK))
    for name in ("blip", "wd14"):
        assert cache_settings(name, white) != cache_settings(name, black)


def test_the_background_changes_the_pixels_latents_are_encoded_from(store):
    store, sha = store
    entry = LatentEntry(sha, Crop(64, 64, 64, 64, 0, 0, Bucket(64, 64)))
    on_white = pixels_of(entry, store, 10**7, build(TrainParams, {}, "train").background)
    on_black = pixels_of(entry, store, 10**7, build(TrainParams, {"background": [0, 0, 0]}, "train").background)
    assert torch.equal(on_white[:, 0, 0], torch.ones(3)) and torch.equal(on_black[:, 0, 0], -torch.ones(3))
    assert torch.equal(on_white[:, 40:], on_black[:, 40:])


def test_the_background_changes_fetch_time_hashes_and_cmmd_references(store):
    store, sha = store
    data = store.read(sha)
    assert image_facts(data, background=BLACK).phash != image_facts(data).phash
    assert recipe(BLACK) != recipe()  # hashes on another background are measured again, not reused
    cmmd = build(EvaluateParams, {"cmmd": {"background": [0, 0, 0]}}, "evaluate").cmmd
    assert np.asarray(reference_loader(store, cmmd.background)(sha))[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(reference_loader(store)(sha))[0, 0].tolist() == [255, 255, 255]
