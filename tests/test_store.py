"""The shard store's index: read from the tar headers alone, and the same as tarfile's parse."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from postertune.errors import PipelineError
from postertune.store import ShardStore, ShardWriter, sha256_hex


def tarfile_index(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def store_index(root: Path) -> dict[str, tuple[int, int]]:
    return {name: (loc.offset, loc.length) for name, loc in ShardStore(root).index.items()}


def images(count: int) -> dict[str, bytes]:
    payloads = [bytes([i % 251]) * (i * 37 % 1500) for i in range(count)]  # 0 bytes, multiples of 512, odd sizes
    return {sha256_hex(data + i.to_bytes(4)): data for i, data in enumerate(payloads)}


def test_the_index_of_written_shards_equals_tarfiles_and_reads_back_every_image(tmp_path):
    stored = images(300)
    with ShardWriter(tmp_path, max_images=128) as writer:
        for sha, data in stored.items():
            writer.add(sha, data)
    shards = sorted(tmp_path.glob("shard-*.tar"))
    assert len(shards) == 3
    assert {k: (v.shard, v.offset, v.length) for k, v in ShardStore(tmp_path).index.items()} == {
        name: (shard.name, *where) for shard in shards for name, where in tarfile_index(shard).items()
    }
    with ShardStore(tmp_path) as store:
        assert {sha: store.read(sha) for sha in stored} == stored


def test_a_shard_in_another_tar_dialect_is_indexed_as_tarfile_reads_it(tmp_path):
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir("folder"))
        for name in ("a" * 150, "plain", "ünïcode"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"bytes"))
    assert store_index(tmp_path) == tarfile_index(path)
    assert set(store_index(tmp_path)) == {"a" * 150, "plain", "ünïcode"}


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("damage", ["checksum", "truncated"])
def test_a_damaged_shard_is_named_in_one_line(tmp_path, damage):
    with ShardWriter(tmp_path) as writer:
        for sha, data in images(5).items():
            writer.add(sha, data)
    path = tmp_path / "shard-00000.tar"
    shard = bytearray(path.read_bytes())
    if damage == "checksum":  # in the third header: tarfile itself would stop there without a word
        with tarfile.open(path) as tar:
            third = tar.getmembers()[2].offset
        shard[third + 10] ^= 0xFF
    else:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        shard = shard[: last.offset_data + last.size // 2]
    path.write_bytes(bytes(shard))
    with pytest.raises(PipelineError, match=f"{path}: damaged shard"):
        len(ShardStore(tmp_path))
