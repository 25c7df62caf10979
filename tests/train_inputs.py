"""Inputs for the train tests: synthetic posters in a shard store, a captions table, params."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image, ImageDraw

from postertune.store import ShardWriter, sha256_hex

# Small and quick: buckets 64x128, 96x96 and 128x64; a few steps of the tiny model.
NESTED = ("validation", "samples", "checkpoints")
FAST_PARAMS = dict(
    base="tiny",
    captions="captions.parquet",
    shards="shards",
    resolution=96,
    bucket_step=32,
    min_bucket_reso=32,
    max_bucket_reso=192,
    batch_size=2,
    max_train_steps=6,
    learning_rate=1.0e-3,
    optimizer="AdamW",
    lr_scheduler="constant",
    lr_warmup_steps=0,
    optimizer_args={},
    shuffle_caption=False,
    keep_tokens=0,
    caption_dropout_rate=0.0,
    long_caption_ratio=0.0,
    noise_offset=0.05,
    snr_gamma=5.0,
    validation={"split": 0},
    checkpoints={"every_n_steps": 0},
    samples={"every_n_steps": 0},
)


def poster_bytes(seed: int, width: int, height: int, fmt: str = "PNG") -> bytes:
    """A poster-like picture: a flat background, a few blocks of colour and a title bar."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.rectangle([x, y, x + width // 3, y + height // 4], fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.rectangle([0, height * 4 // 5, width, height], fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_dataset(folder: Path, sizes: list[tuple[int, int]]) -> pd.DataFrame:
    """``folder/shards`` and ``folder/captions.parquet`` with one poster per (width, height)."""
    rows = []
    with ShardWriter(folder / "shards") as writer:
        for i, (width, height) in enumerate(sizes):
            data = poster_bytes(i, width, height)
            sha = sha256_hex(data)
            writer.add(sha, data)
            rows.append(
                dict(
                    sha256=sha,
                    caption=f"movie poster, genre{i % 3}, title{i}, bold letters, dark",
                    caption_long=f"A poster for film number {i}, with coloured blocks and a white title bar.",
                    tags=["movie poster", f"genre{i % 3}", f"title{i}", "bold letters", "dark"],
                    width=width,
                    height=height,
                    title=f"Film {i}",
                )
            )
    frame = pd.DataFrame(rows)
    frame.to_parquet(folder / "captions.parquet", index=False)
    return frame


def train_section(**overrides) -> dict:
    """``FAST_PARAMS`` with ``overrides``; a nested section (``validation={...}``) updates its keys."""
    section = {key: dict(value) if isinstance(value, dict) else value for key, value in FAST_PARAMS.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict) and key in NESTED:
            section[key].update(value)
        else:
            section[key] = value
    return section


def write_params(folder: Path, **overrides) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"train": train_section(**overrides)}, sort_keys=False))
    return path


@pytest.fixture
def fresh_process_state():
    """Each stage run normally has a process of its own; here several share one.

    accelerate keeps its state (precision, device) per process, so it is cleared between
    runs. Tiny models run fastest on one thread, above all on a machine shared with other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
