"""Latents encoded once and kept on disk, keyed by image, bucket, crop and VAE.

A cached entry holds the VAE latent of exactly one crop of one image and the
micro-conditioning of that crop, so what the U-Net is told always matches what it sees.
The folder is named by a fingerprint of the VAE weights, the encode dtype and the
background transparent images are composited onto: a new VAE never reuses latents of the
old one. Entries are packed into shards (``packed``) written atomically one by one, so an
interrupted cache build resumes from its last finished shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from postertune.errors import PipelineError
from postertune.fingerprint import fingerprint_module
from postertune.imagesafe import WHITE, ImageRejected, load_image
from postertune.store import ShardStore
from postertune.train.buckets import Crop
from postertune.train.packed import MAX_BYTES, MAX_ENTRIES, PackedTensors

CACHE_FORMAT = 2  # bump when the way pixels become latents changes (resampling, value range, EXIF orientation)


@dataclass(frozen=True)
class LatentEntry:
    sha256: str
    crop: Crop

    @property
    def key(self) -> str:
        c = self.crop
        flip = "-flip" if c.flipped else ""
        return f"{self.sha256}-{c.bucket.name}-{c.resized_width}x{c.resized_height}+{c.left}+{c.top}{flip}"


def vae_cache_id(vae: torch.nn.Module, dtype: torch.dtype, background: tuple[int, int, int] = WHITE) -> str:
    return fingerprint_module(vae, str(dtype), CACHE_FORMAT, list(background))[:16]


class LatentCache:
    def __init__(self, root: Path, vae_id: str, shard_entries: int = MAX_ENTRIES, shard_bytes: int = MAX_BYTES):
        self.folder = Path(root) / "latents" / vae_id
        self.packed = PackedTensors(self.folder, shard_entries, shard_bytes)

    def missing(self, entries: list[LatentEntry]) -> list[LatentEntry]:
        """``entries`` (each once) not cached in an intact shard."""
        unique = list(dict.fromkeys(entries))
        absent = set(self.packed.missing(e.key for e in unique))
        return [e for e in unique if e.key in absent]

    def load(self, entry: LatentEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latent and its time_ids (original_h, original_w, crop_top, crop_left, target_h, target_w)."""
        tensors = self.packed.get(entry.key)
        return tensors["latent"], tensors["time_ids"].to(torch.float32)

    @staticmethod
    def record(entry: LatentEntry, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the cache keeps of ``entry``: its latent and the time_ids of its crop."""
        return {"latent": latent, "time_ids": torch.tensor(entry.crop.time_ids(), dtype=torch.int64)}

    @torch.no_grad()
    def fill(
        self,
        entries: list[LatentEntry],
        store: ShardStore,
        vae: torch.nn.Module,
        batch_size: int,
        max_pixels: int,
        show_progress: bool = True,
        background: tuple[int, int, int] = WHITE,
    ) -> int:
        """Encode every entry not cached yet; returns how many were encoded."""
        todo = sorted(self.missing(entries), key=lambda e: (e.crop.bucket, e.sha256))
        param = next(vae.parameters())
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with (
            tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show_progress) as bar,
            self.packed.writer() as writer,
        ):
            for _, group in groupby(todo, key=lambda e: e.crop.bucket):
                group = list(group)
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    pixels = torch.stack([pixels_of(e, store, max_pixels, background) for e in chunk])
                    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
                    for entry, latent in zip(chunk, ((latents - shift) * scale).float().cpu(), strict=True):
                        if not torch.isfinite(latent).all():
                            raise PipelineError(
                                f"image {entry.sha256}: the VAE gave NaN/inf latents (fp16 VAE overflow: "
                                "use the fp16-fix VAE via train.vae or set train.no_half_vae: true)"
                            )
                        writer.add(entry.key, self.record(entry, latent))
                    bar.update(len(chunk))
        return len(todo)


def pixels_of(
    entry: LatentEntry, store: ShardStore, max_pixels: int, background: tuple[int, int, int] = WHITE
) -> torch.Tensor:
    """The image (upright, transparency on ``background``) cropped as ``entry`` says, as a CHW tensor in [-1, 1]."""
    crop = entry.crop
    try:
        image = load_image(store.read(entry.sha256), max_pixels, background=background)
    except ImageRejected as exc:
        raise PipelineError(f"image {entry.sha256} in {store.root}: cannot be decoded ({exc.reason})") from None
    if image.size != (crop.original_width, crop.original_height):
        raise PipelineError(
            f"image {entry.sha256}: is {image.width}x{image.height} but the captions table says "
            f"{crop.original_width}x{crop.original_height}"
        )
    image = image.resize((crop.resized_width, crop.resized_height), Image.Resampling.LANCZOS)
    if crop.flipped:
        image = ImageOps.mirror(image)
    image = image.crop((crop.left, crop.top, crop.left + crop.bucket.width, crop.top + crop.bucket.height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
