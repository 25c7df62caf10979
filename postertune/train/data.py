"""The training table, the held-out split, and the samples a step trains on.

Every random choice a sample needs at a step (flip, caption, noise, timestep) comes
from a seed derived from (run seed, epoch, position in the epoch). The order of an
epoch is itself a pure function of (run seed, epoch). So the data a step sees does not
depend on how many processes share the work, on data-loader workers, or on whether the
run was resumed: a step number says everything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from postertune.errors import PipelineError
from postertune.params import ParamError
from postertune.train.buckets import Bucket, make_buckets, nearest_bucket, plan_crop
from postertune.train.captions import CaptionPolicy
from postertune.train.latent_cache import LatentCache, LatentEntry
from postertune.train.noise import NoiseRecipe, draw_noise, perturb
from postertune.train.params import TrainParams
from postertune.train.text import TextCache
from postertune.train.timesteps import TimestepSampler

REQUIRED_COLUMNS = ("sha256", "caption", "width", "height")


def derive_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Example:
    sha256: str
    caption: str
    caption_long: str
    width: int
    height: int


def read_examples(path: Path) -> list[Example]:
    """One example per image of the captions table, in table order."""
    if not Path(path).is_file():
        raise ParamError("train.captions", f"{path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types on damaged files
        raise ParamError("train.captions", f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ParamError("train.captions", f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise ParamError("train.captions", f"{path}: no images to train on (the table is empty)")
    longs = frame["caption_long"] if "caption_long" in frame.columns else pd.Series([""] * len(frame))
    examples, seen = [], set()
    for row, (sha, caption, long, width, height) in enumerate(
        zip(frame["sha256"], frame["caption"], longs, frame["width"], frame["height"], strict=True)
    ):
        if not isinstance(sha, str) or len(sha) != 64:
            raise PipelineError(f"{path}: row {row}: sha256 {sha!r} is not a sha256 hex digest")
        if pd.isna(width) or pd.isna(height) or int(width) < 1 or int(height) < 1:
            raise PipelineError(f"{path}: row {row}: image size {width}x{height} is not valid")
        if sha not in seen:
            seen.add(sha)
            examples.append(Example(sha, _text(caption), _text(long), int(width), int(height)))
    return examples


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def split_validation(examples: list[Example], split: int | float) -> tuple[list[Example], list[Example]]:
    """Hold out the images with the lowest sha256: a stable choice that any run repeats."""
    count = split if isinstance(split, int) else (max(1, round(len(examples) * split)) if split > 0 else 0)
    if count >= len(examples):
        raise ParamError(
            "train.validation.split", f"holds out {count} of {len(examples)} images: none left to train on"
        )
    held = set(sorted(e.sha256 for e in examples)[:count])
    return [e for e in examples if e.sha256 not in held], [e for e in examples if e.sha256 in held]


def plan_entries(examples: list[Example], params: TrainParams) -> list[list[LatentEntry]]:
    """Per example, the cached crops it can train with: [as is] or [as is, mirrored] with flip_aug."""
    buckets = make_buckets(
        params.resolution, params.bucket_step, params.min_bucket_reso, params.max_bucket_reso, params.max_aspect_ratio
    )
    if not buckets:
        raise ParamError("train.max_aspect_ratio", "no bucket fits the resolution, side limits and aspect limit")
    plans = []
    for ex in examples:
        bucket = nearest_bucket(ex.width, ex.height, buckets)
        rng = random.Random(derive_seed(params.seed, int(ex.sha256[:15], 16))) if params.random_crop else None
        crop = plan_crop(ex.width, ex.height, bucket, rng)
        entries = [LatentEntry(ex.sha256, crop)]
        if params.flip_aug:
            entries.append(LatentEntry(ex.sha256, crop.mirrored()))
        plans.append(entries)
    return plans


class BucketBatchSampler:
    """Micro-batches for one process: each step's global batch (batch_size × processes) comes
    from one bucket and is shuffled per epoch; process ``rank`` takes its slice.

    A bucket whose images do not fill its last global batch tops it up with its own
    images again, so no image is ever left out of an epoch.
    """

    def __init__(self, buckets: list[Bucket], batch_size: int, num_processes: int, rank: int, seed: int):
        self.buckets, self.batch_size, self.rank, self.seed = buckets, batch_size, rank, seed
        self.global_size = batch_size * num_processes
        self.start = 0  # first micro-batch to yield (set on resume)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(derive_seed(self.seed, epoch))
        by_bucket: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for _, indices in sorted(by_bucket.items()):
            rng.shuffle(indices)
            needed = -(-len(indices) // self.global_size) * self.global_size
            padded = (indices * -(-needed // len(indices)))[:needed]
            batches += [padded[i : i + self.global_size] for i in range(0, len(padded), self.global_size)]
        rng.shuffle(batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_epoch = self.batches_per_epoch
        micro = self.start
        while True:
            epoch, position = divmod(micro, per_epoch)
            batches = self.epoch_batches(epoch)
            for i in range(position, per_epoch):
                first = i * self.global_size + self.rank * self.batch_size
                local = batches[i][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                yield [(index, derive_seed(self.seed, epoch, first + j)) for j, index in enumerate(local)]
            micro = (epoch + 1) * per_epoch


class TrainDataset(torch.utils.data.Dataset):
    """Item ``(example index, sample seed)`` → one sample: cached latent, its time_ids, the
    caption of this step (or its cached embeddings), noise and timestep; under input
    perturbation also ``input_noise``, the noise the latent is diffused with."""

    def __init__(
        self,
        examples: list[Example],
        entries: list[list[LatentEntry]],
        latents: LatentCache,
        texts: TextCache | None,
        policy: CaptionPolicy,
        noise: NoiseRecipe,
        timesteps: TimestepSampler,
    ):
        self.examples, self.entries, self.latents, self.texts = examples, entries, latents, texts
        self.policy, self.noise, self.timesteps = policy, noise, timesteps

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = random.Random(derive_seed(seed, 0))  # crop choice and caption
        generator = torch.Generator().manual_seed(derive_seed(seed, 1))  # noise and timestep
        example = self.examples[index]
        latent, time_ids = self.latents.load(rng.choice(self.entries[index]))
        noise = draw_noise(latent.shape, generator, self.noise)
        sample = {"latent": latent, "time_ids": time_ids, "noise": noise, "timestep": self.timesteps.draw(generator)}
        if self.noise.input_perturbation:
            sample["input_noise"] = perturb(noise, generator, self.noise.input_perturbation)
        if self.texts is None:
            sample["caption"] = self.policy.choose(example.caption, example.caption_long, rng)
        else:
            caption = self.policy.fixed(example.caption, example.caption_long)
            sample["prompt_embeds"], sample["pooled_prompt_embeds"] = self.texts.load(caption)
        return sample


def collate(samples: list[dict]) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "caption"}
    if "caption" in samples[0]:
        batch["captions"] = [s["caption"] for s in samples]
    return batch
