"""Aspect-ratio buckets and the crop each image gets, with SDXL's micro-conditioning.

Every bucket holds about ``resolution²`` pixels with sides that are multiples of
``step``; an image goes to the bucket nearest its aspect ratio, is resized to cover
it and cropped to it. The crop is planned once, when its latent is cached, and the
U-Net is told exactly that crop: time_ids = (original_h, original_w, crop_top,
crop_left, target_h, target_w).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Crop:
    """Resize the original to ``resized_*`` (covering the bucket), then cut the bucket at ``left``, ``top``."""

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    left: int
    top: int
    bucket: Bucket
    flipped: bool = False

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.original_height,
            self.original_width,
            self.top,
            self.left,
            self.bucket.height,
            self.bucket.width,
        )

    def mirrored(self) -> Crop:
        """The same crop of the horizontally flipped image: the left offset counts from the other side."""
        return Crop(
            self.original_width,
            self.original_height,
            self.resized_width,
            self.resized_height,
            self.resized_width - self.bucket.width - self.left,
            self.top,
            self.bucket,
            not self.flipped,
        )


def make_buckets(resolution: int, step: int, min_side: int, max_side: int, max_aspect_ratio: float) -> list[Bucket]:
    """All buckets of at most ``resolution²`` pixels, each side as long as that area allows."""
    area = resolution * resolution
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side and max(width, height) / min(width, height) <= max_aspect_ratio:
            buckets.add(Bucket(width, height))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (on a log scale, so 2:1 and 1:2 weigh alike)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.width * b.height))


def plan_crop(width: int, height: int, bucket: Bucket, rng: random.Random | None = None) -> Crop:
    """Scale to cover ``bucket``, then crop it out: centred, or at a random offset drawn from ``rng``."""
    scale = max(bucket.width / width, bucket.height / height)
    resized_w = max(bucket.width, round(width * scale))
    resized_h = max(bucket.height, round(height * scale))
    spare_w, spare_h = resized_w - bucket.width, resized_h - bucket.height
    if rng is None:
        left, top = spare_w // 2, spare_h // 2
    else:
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    return Crop(width, height, resized_w, resized_h, left, top, bucket)
