"""One pass of one CLIP image encoder over the images the cache lacks, and the scores read
back from the cache: aesthetic score (LAION head), CLIP image–caption similarity (short and
long caption), JPEG quality and grey-level spread."""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from postertune.curate.cache import EmbeddingCache, ImageRecord, text_key
from postertune.imagesafe import ImageRejected, load_image
from postertune.jpegquality import jpeg_quality
from postertune.launch import ONE_PROCESS, Processes
from postertune.models.aesthetic import AestheticHead
from postertune.models.clip import ClipEncoder, clip_scores
from postertune.store import ShardStore

SPREAD_SIDE = 64  # the grey-level spread is measured on a thumbnail this wide


@dataclass(frozen=True)
class Decoded:
    sha256: str
    image: Image.Image | None
    record: ImageRecord  # the model-free measures, or the skip reason


def decode(sha: str, data: bytes, max_pixels: int, background: tuple[int, int, int]) -> Decoded:
    """The RGB image the encoder sees (the decoding the evaluate stage uses) and the measures
    taken from the file itself; an unreadable image becomes a skip record, never an error."""
    try:
        image = load_image(data, max_pixels, background=background)
    except ImageRejected as exc:
        return Decoded(sha, None, ImageRecord(sha, skip=f"unreadable: {exc.reason}"))
    quality = jpeg_quality(Image.open(io.BytesIO(data)))
    grey = image.convert("L")
    grey.thumbnail((SPREAD_SIDE, SPREAD_SIDE))
    spread = float(np.asarray(grey, dtype=np.float64).std())
    return Decoded(sha, image, ImageRecord(sha, jpeg_quality=quality, pixel_std=round(spread, 4)))


@dataclass(frozen=True)
class PassReport:
    images: int = 0  # embedded this run, by every process together
    texts: int = 0
    unreadable: int = 0

    @property
    def model_loaded(self) -> bool:
        return bool(self.images or self.texts or self.unreadable)


def score_pass(
    shas: list[str],
    texts: list[str],
    store: ShardStore,
    cache: EmbeddingCache,
    load_clip: Callable[[], ClipEncoder],
    batch_size: int,
    chunk_size: int,
    workers: int,
    max_pixels: int,
    background: tuple[int, int, int],
    processes: Processes = ONE_PROCESS,
) -> PassReport:
    """Embed every stored image and every text the cache lacks, one chunk (one cache part) at
    a time; the model loads only when there is something to embed. Each process takes its share
    of the chunks one process would embed, so every batch holds the same images whatever the
    process count; the main process then reads every process's parts (the others' caches stay
    as they were)."""
    pending = [sha for sha in dict.fromkeys(shas) if sha in store and sha not in cache.images]
    keys = {text_key(t): t for t in texts}
    pending_texts = [(key, text) for key, text in keys.items() if key not in cache.texts]
    if not pending and not pending_texts:
        return PassReport()
    image_chunks = processes.share([pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)])
    text_chunks = processes.share([pending_texts[i : i + chunk_size] for i in range(0, len(pending_texts), chunk_size)])
    clip = load_clip() if image_chunks or text_chunks else None
    with ThreadPoolExecutor(workers) as pool, tqdm(total=sum(map(len, image_chunks)), desc="curate", unit="img") as bar:
        for chunk in image_chunks:
            decoded = list(pool.map(lambda sha: decode(sha, store.read(sha), max_pixels, background), chunk))
            good = [d for d in decoded if d.image is not None]
            embeddings = {}
            for first in range(0, len(good), batch_size):
                batch = good[first : first + batch_size]
                embeddings.update(
                    zip([d.sha256 for d in batch], clip.encode_images([d.image for d in batch]), strict=True)
                )
            records = [
                ImageRecord(d.sha256, embeddings[d.sha256], d.record.jpeg_quality, d.record.pixel_std)
                if d.image is not None
                else d.record
                for d in decoded
            ]
            cache.add_images(records)
            bar.update(len(chunk))
    for chunk in text_chunks:
        encoded = np.concatenate(
            [clip.encode_texts([t for _, t in chunk[i : i + batch_size]]) for i in range(0, len(chunk), batch_size)]
        )
        cache.add_texts(dict(zip([k for k, _ in chunk], encoded, strict=True)))
    processes.wait()
    if processes.main:
        if processes.count > 1:
            cache.reload()
        cache.compact()
    embedded = sum(cache.images[sha].embedding is not None for sha in pending if sha in cache.images)
    return PassReport(embedded, len(pending_texts), len(pending) - embedded)


def read_scores(
    table: pd.DataFrame, store: ShardStore, cache: EmbeddingCache, head: AestheticHead | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per caption row: the scores, or why there are none (``skip``); and the image embeddings
    of the scored rows (in row order, NaN rows for the others). ``head`` may be None only when
    no image has an embedding."""
    dim = next((len(r.embedding) for r in cache.images.values() if r.embedding is not None), 1)
    embeddings = np.full((len(table), dim), np.nan, dtype=np.float32)
    scores = pd.DataFrame(index=table.index)
    skip, quality, spread = [], [], []
    for i, sha in enumerate(table["sha256"]):
        record = cache.images.get(sha)
        if sha not in store and (record is None or record.embedding is None):
            record = ImageRecord(sha, skip="missing_image")
        elif record is None:  # stored but not scored: cannot happen after score_pass
            record = ImageRecord(sha, skip="not_scored")
        skip.append(record.skip)
        quality.append(record.jpeg_quality)
        spread.append(record.pixel_std)
        if record.embedding is not None:
            embeddings[i] = record.embedding
    scored = np.array([s is None for s in skip], dtype=bool)
    aesthetic = np.full(len(table), np.nan)
    short = np.full(len(table), np.nan)
    long = np.full(len(table), np.nan)
    if scored.any():
        aesthetic[scored] = head.score(embeddings[scored])
        for column, out in (("caption", short), ("caption_long", long)):
            if column not in table.columns:
                continue
            texts = table[column].where(table[column].notna(), None)
            has = scored & texts.map(lambda t: isinstance(t, str) and t != "").to_numpy()
            if has.any():
                text_embeddings = np.stack([cache.texts[text_key(t)] for t in texts[has]])
                out[has] = clip_scores(embeddings[has], text_embeddings)
    scores["aesthetic_score"] = aesthetic
    scores["clip_similarity_short"] = short
    scores["clip_similarity_long"] = long
    scores["jpeg_quality"] = pd.array(quality, dtype="Int16")
    scores["pixel_std"] = pd.array(spread, dtype="Float64").astype(float)
    scores["skip"] = skip
    return scores, embeddings


def caption_texts(table: pd.DataFrame) -> list[str]:
    """Every non-empty short and long caption of the table: what the text encoder embeds."""
    found = []
    for column in ("caption", "caption_long"):
        if column in table.columns:
            found.extend(t for t in table[column] if isinstance(t, str) and t)
    return list(dict.fromkeys(found))
