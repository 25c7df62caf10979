"""The packed latent and text-embedding caches: values round-trip, an interrupted fill
keeps its finished shards, a damaged or cut shard is found and rebuilt, and the keys
tell crops, buckets, flips and VAEs apart."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from postertune.models.prompts import PromptEncoder
from postertune.models.tiny import build_tiny_pipeline, tiny_vae_config
from postertune.params import build
from postertune.store import ShardStore
from postertune.train.buckets import Bucket, Crop
from postertune.train.data import plan_entries, read_examples
from postertune.train.latent_cache import LatentCache, LatentEntry, pixels_of, vae_cache_id
from postertune.train.packed import PackedTensors
from postertune.train.params import TrainParams
from postertune.train.text import TextCache
from tests.train_inputs import train_section, write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZES = [(200, 300), (300, 200), (300, 300), (200, 300), (240, 300)]


def tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**tiny_vae_config()).eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_vae(0)


@pytest.fixture
def dataset(tmp_path) -> tuple[list[LatentEntry], ShardStore]:
    write_dataset(tmp_path, SIZES)
    examples = read_examples(tmp_path / "captions.parquet")
    plans = plan_entries(examples, build(TrainParams, train_section(random_crop=True, flip_aug=True), "train"))
    return [e for plan in plans for e in plan], ShardStore(tmp_path / "shards")


def fill(cache: LatentCache, entries: list[LatentEntry], store: ShardStore, vae: AutoencoderKL) -> int:
    return cache.fill(entries, store, vae, batch_size=1, max_pixels=10**7, show_progress=False)


def cached(cache: LatentCache, entries: list[LatentEntry]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # copies: a loaded tensor maps its shard, and these tests damage shards in place
    return {e.key: tuple(t.clone() for t in cache.load(e)) for e in entries}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key


def test_packed_entries_round_trip_in_few_files(tmp_path):
    packed = PackedTensors(tmp_path / "packed", max_entries=3)
    entries = {
        f"entry-{i}": {
            "latent": torch.randn(4, 2 + i % 3, 5, dtype=(torch.float32, torch.bfloat16, torch.float16)[i % 3]),
            "time_ids": torch.arange(6, dtype=torch.int64) * i,
        }
        for i in range(10)
    }
    with packed.writer() as writer:
        for key, tensors in entries.items():
            writer.add(key, tensors)
    assert len(packed.shards()) == 4 and len(packed) == 10  # 3 + 3 + 3 + 1
    assert sorted((tmp_path / "packed").iterdir()) == packed.shards()  # no leftover temporary file
    for reader in (packed, PackedTensors(tmp_path / "packed"), pickle.loads(pickle.dumps(packed))):
        for key, tensors in entries.items():
            got = reader.get(key)
            assert got.keys() == tensors.keys()
            assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in tensors.items()), key
    assert packed.missing(["entry-3", "entry-10"]) == ["entry-10"]


def test_latents_round_trip_and_a_second_fill_encodes_nothing(dataset, vae, tmp_path):
    entries, store = dataset
    cache = LatentCache(tmp_path / "cache", vae_cache_id(vae, torch.float32), shard_entries=4)
    assert fill(cache, entries, store, vae) == len(entries) == 10
    assert len(cache.packed.shards()) == 3
    for entry in entries:
        latent, time_ids = cache.load(entry)
        with torch.no_grad():
            pixels = pixels_of(entry, store, 10**7)[None]
            expected = vae.encode(pixels).latent_dist.mode()[0] * vae.config.scaling_factor
        assert torch.equal(latent, expected)
        assert time_ids.dtype == torch.float32 and tuple(time_ids.tolist()) == entry.crop.time_ids()
    assert fill(cache, entries, store, vae) == 0


def test_an_interrupted_fill_keeps_its_finished_shards_and_resumes(dataset, vae, tmp_path, monkeypatch):
    entries, store = dataset
    vae_id = vae_cache_id(vae, torch.float32)
    complete = LatentCache(tmp_path / "complete", vae_id, shard_entries=4)
    fill(complete, entries, store, vae)

    cache = LatentCache(tmp_path / "cache", vae_id, shard_entries=4)
    encode, calls = vae.encode, []

    def dies_on_the_seventh_batch(pixels):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return encode(pixels)

    monkeypatch.setattr(vae, "encode", dies_on_the_seventh_batch)
    with pytest.raises(KeyboardInterrupt):
        fill(cache, entries, store, vae)
    monkeypatch.undo()
    assert len(cache.packed.shards()) == 1  # the first 4 entries; the next 2 were in the open shard
    assert len(cache.missing(entries)) == 6
    assert fill(cache, entries, store, vae) == 6
    assert_same(cached(cache, entries), cached(complete, entries))


@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "emptied"])
def test_a_damaged_shard_is_found_and_its_entries_encoded_again(dataset, vae, tmp_path, damage):
    entries, store = dataset
    cache = LatentCache(tmp_path / "cache", vae_cache_id(vae, torch.float32), shard_entries=4)
    fill(cache, entries, store, vae)
    before = cached(cache, entries)
    shard = cache.packed.shards()[1]
    held = [e for e in entries if cache.packed.index[e.key][0] == shard.name]
    data = shard.read_bytes()
    shard.write_bytes(
        {
            "flipped byte": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
            "cut short": data[: len(data) // 2],
            "emptied": b"",
        }[damage]
    )
    cache.packed.refresh()
    assert cache.missing(entries) == held and not shard.exists()
    assert fill(cache, entries, store, vae) == len(held)
    assert_same(cached(cache, entries), before)


def test_keys_tell_crops_buckets_flips_and_vaes_apart(dataset, vae, tmp_path):
    planned, store = dataset
    sha = next(e.sha256 for e in planned if (e.crop.original_width, e.crop.original_height) == (200, 300))
    base = Crop(200, 300, 64, 96, 0, 0, Bucket(64, 96))
    variants = [
        base,
        Crop(200, 300, 64, 96, 0, 0, Bucket(64, 96), flipped=True),
        Crop(200, 300, 64, 128, 0, 16, Bucket(64, 96)),
        Crop(200, 300, 64, 128, 0, 32, Bucket(64, 96)),
        Crop(200, 300, 96, 144, 16, 16, Bucket(64, 96)),
        Crop(200, 300, 64, 96, 0, 0, Bucket(64, 64)),
    ]
    entries = [LatentEntry(sha, crop) for crop in variants]
    assert len({e.key for e in entries}) == len(entries)
    cache = LatentCache(tmp_path / "cache", vae_cache_id(vae, torch.float32))
    assert fill(cache, entries, store, vae) == len(entries)
    latents = [cache.load(e)[0] for e in entries]
    for i in range(len(latents)):
        for j in range(i):
            assert latents[i].shape != latents[j].shape or not torch.equal(latents[i], latents[j]), (i, j)

    other = tiny_vae(1)
    assert vae_cache_id(other, torch.float32) != vae_cache_id(vae, torch.float32)
    assert LatentCache(tmp_path / "cache", vae_cache_id(other, torch.float32)).missing(entries) == entries


def test_text_embeddings_round_trip(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    encode = PromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, 150)
    captions = [f"movie poster, genre {i}, bold title" for i in range(5)] + ["x " * 100]
    cache = TextCache(tmp_path, encode.cache_id, shard_entries=4)
    assert cache.fill(captions + captions[:2], encode, batch_size=3, show_progress=False) == 6
    assert len(cache.packed.shards()) == 2
    assert cache.fill(captions, encode, batch_size=3, show_progress=False) == 0
    embeds, pooled = encode(captions)
    for caption, e, p in zip(captions, embeds, pooled, strict=True):
        got_e, got_p = TextCache(tmp_path, encode.cache_id).load(caption)
        assert torch.equal(got_e, e) and torch.equal(got_p, p)


def test_a_cache_folder_holds_shards_not_a_file_per_entry(dataset, vae, tmp_path):
    entries, store = dataset
    cache = LatentCache(tmp_path / "cache", vae_cache_id(vae, torch.float32))
    fill(cache, entries, store, vae)
    files = [p for p in Path(cache.folder).rglob("*") if p.is_file()]
    assert files == cache.packed.shards() and len(files) == 1
