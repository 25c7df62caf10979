"""The resumable caption run: read the kept images, run the captioners in order (each
image captioner only on images its cache lacks), combine, write, export, report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
from PIL import Image
from tqdm import tqdm

from postertune.atomic import write_json, write_parquet
from postertune.caption.cache import CaptionCache, CaptionRecord
from postertune.caption.combine import combine_captions
from postertune.caption.export import export_dataset
from postertune.caption.metadata import render_template
from postertune.caption.params import CaptionParams, MetadataParams, template_fields
from postertune.caption.report import caption_metrics
from postertune.errors import PipelineError
from postertune.imagesafe import ImageRejected, load_image
from postertune.launch import ONE_PROCESS, Processes, launched_processes
from postertune.params import ParamError
from postertune.store import ShardStore
from postertune.tables import iter_records

REQUIRED_COLUMNS = ("sha256", "width", "height")
CURRENT_CACHES = "current.json"
CAPTIONS, CACHE_DIR, EXPORT_DIR = "captions.parquet", "cache", "export"  # in params.output
PIXELS = "upright"  # how images are decoded for the captioners: a change captions them again


@dataclass
class CaptionReport:
    metrics: dict
    computed: dict[str, int] = field(default_factory=dict)  # images each image captioner ran on (not cached)


class ImageCaptioner(Protocol):
    name: str
    batch_size: int
    image_size: int

    def caption(self, shas: list[str], images: list[Image.Image]) -> list[CaptionRecord]: ...


def read_images(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (the filter stage writes it)") from None
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise PipelineError(f"{path}: unreadable Parquet ({type(exc).__name__})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]!r}")
    empty = table["sha256"].isna() | (table["sha256"].astype(str).str.len() == 0)
    if empty.any():
        raise PipelineError(f"{path}: row {int(empty.to_numpy().argmax())}: sha256 is empty")
    repeated = table["sha256"].duplicated()
    if repeated.any():
        row = int(repeated.to_numpy().argmax())
        raise PipelineError(f"{path}: row {row}: sha256 {table['sha256'].iloc[row]} appears twice")
    return table.reset_index(drop=True)


def check_columns(table: pd.DataFrame, params: CaptionParams, path: Path) -> None:
    """Every column the params name must exist, before any model is loaded."""
    columns = set(table.columns)
    if "metadata" in params.captioners:
        for key in ("template", "long_template"):
            for name in template_fields(getattr(params.metadata, key)):
                if name not in columns:
                    raise ParamError(f"caption.metadata.{key}", f"field {{{name}}} is not a column of {path}")
    for name in params.combine.tag_columns:
        if name not in columns:
            raise ParamError("caption.combine.tag_columns", f"{name!r} is not a column of {path}")
    if params.export.images and "format" not in columns:
        raise ParamError("caption.export.images", f"{path} has no 'format' column to name the image files by")


def caption_metadata(table: pd.DataFrame, params: MetadataParams) -> dict[str, CaptionRecord]:
    records = {}
    columns = ["sha256", *template_fields(params.template), *template_fields(params.long_template)]
    for row in iter_records(table, columns):
        sha = row["sha256"]
        short = render_template(params.template, row) or None
        long = render_template(params.long_template, row) or None
        records[sha] = CaptionRecord(sha, short, long) if short or long else CaptionRecord(sha, skip="empty_metadata")
    return records


def _decode(data: bytes, max_pixels: int, size: int, background: tuple[int, int, int]) -> Image.Image | str:
    try:
        return load_image(data, max_pixels, draft=(size, size), background=background)
    except ImageRejected as exc:
        return exc.reason


def _decoded_chunks(
    chunks: list[list[str]], read: Callable[[str], bytes | None], decode: Callable[[bytes], object], pool
) -> Iterator[list[tuple[str, Future | str]]]:
    """Chunks of (sha, decoding future or skip reason); the next chunk decodes while
    the caller captions this one."""
    ahead = None
    for shas in chunks:
        chunk = []
        for sha in shas:
            data = read(sha)
            chunk.append((sha, pool.submit(decode, data) if data is not None else "missing_image"))
        if ahead is not None:
            yield ahead
        ahead = chunk
    if ahead is not None:
        yield ahead


def caption_images(
    load: Callable[[], ImageCaptioner],
    cache: CaptionCache,
    shas: list[str],
    store: ShardStore,
    params: CaptionParams,
    processes: Processes = ONE_PROCESS,
) -> int:
    """Caption the images ``cache`` lacks, saving each chunk; returns how many ran, in all
    processes together. Each process takes its share of the chunks one process would
    caption, so every batch holds the same images whatever the process count."""
    pending = [sha for sha in shas if sha not in cache]
    if not pending:
        return 0
    if len(store) == 0:  # also builds the shard index once, before the decoding threads start
        raise PipelineError(f"{store.root}: no image shards to caption (run the fetch stage or dvc pull)")
    chunks = processes.share([pending[i : i + params.chunk_size] for i in range(0, len(pending), params.chunk_size)])
    if chunks:
        _caption_chunks(load(), cache, chunks, store, params)
    if processes.count == 1:
        cache.compact()
    return len(pending)


def _caption_chunks(
    captioner: ImageCaptioner, cache: CaptionCache, chunks: list[list[str]], store: ShardStore, params: CaptionParams
) -> None:
    def read(sha: str) -> bytes | None:
        return store.read(sha) if sha in store else None

    def decode(data: bytes) -> Image.Image | str:
        return _decode(data, params.max_pixels, captioner.image_size, params.background)

    with (
        ThreadPoolExecutor(params.workers) as pool,
        tqdm(total=sum(map(len, chunks)), desc=f"caption {captioner.name}", unit="img") as bar,
    ):
        for chunk in _decoded_chunks(chunks, read, decode, pool):
            records, good = [], []
            for sha, job in chunk:
                result = job.result() if isinstance(job, Future) else job
                if isinstance(result, str):
                    records.append(CaptionRecord(sha, skip=result, bad_image=True))
                else:
                    good.append((sha, result))
            for start in range(0, len(good), captioner.batch_size):
                batch = good[start : start + captioner.batch_size]
                records.extend(captioner.caption([s for s, _ in batch], [image for _, image in batch]))
            cache.add(records)
            bar.update(len(chunk))


def cache_settings(name: str, params: CaptionParams) -> dict:
    """What decides an image captioner's results, and so keys its cache: its own settings and
    the pixels it is shown (decoded upright, transparency on ``params.background``)."""
    own = params.blip.settings() if name == "blip" else params.wd14.settings()
    return own | {"pixels": PIXELS, "background": list(params.background)}


def _loader(name: str, params: CaptionParams, gpu: int) -> tuple[Callable[[], ImageCaptioner], dict]:
    """A deferred model load (only when there is work) and the settings that key the cache.
    The model libraries are imported here too, so a metadata-only run never loads torch."""
    if name == "blip":
        from postertune.caption.blip import BlipCaptioner

        return (lambda: BlipCaptioner(params.blip)), cache_settings(name, params)
    from postertune.caption.wd14 import Wd14Tagger

    return (lambda: Wd14Tagger(params.wd14, gpu)), cache_settings(name, params)


def run(params: CaptionParams) -> dict | None:
    """Caption the kept images; print what ran; return the stage metrics (None in a process
    other than the main one)."""
    report = caption(params)
    if report is None:
        return None
    ran = ", ".join(f"{name} {count}" for name, count in report.computed.items()) or "none"
    print(
        f"caption: {report.metrics['captioned']}/{report.metrics['images']} images captioned; model runs this time: {ran}"
    )
    return report.metrics


def caption(params: CaptionParams) -> CaptionReport | None:
    """Run the captioners in order (each only on images its cache lacks), combine, write, export.

    Launched as several processes, each captions its share; the main process then reads every
    process's cache parts and writes what one process would (the others return None)."""
    table = read_images(params.images)
    check_columns(table, params, params.images)
    shas = table["sha256"].tolist()
    store = ShardStore(params.shards)
    cache_root = params.output / CACHE_DIR
    processes = launched_processes()
    caches: dict[str, CaptionCache] = {}
    computed: dict[str, int] = {}
    try:
        for name in params.captioners:
            if name == "metadata":
                continue
            load, settings = _loader(name, params, processes.local_index)
            caches[name] = CaptionCache(cache_root, name, settings, processes.suffix)
            computed[name] = caption_images(load, caches[name], shas, store, params, processes)
        processes.wait()
        if not processes.main:
            return None
        results: dict[str, dict[str, CaptionRecord]] = {}
        for name in params.captioners:
            if name == "metadata":
                results[name] = caption_metadata(table, params.metadata)
                continue
            cache = caches[name]
            if processes.count > 1:  # every process's parts, folded into one
                cache = CaptionCache(cache_root, name, cache.settings)
                cache.compact()
            results[name] = {sha: cache.records[sha] for sha in shas}
        # captioner -> the cache folder this run's settings use
        write_json(cache_root / CURRENT_CACHES, {name: cache.folder.name for name, cache in caches.items()})
        captions = combine_captions(table, results, params.combine)
        write_parquet(params.output / CAPTIONS, captions)
        export_dataset(params.output / EXPORT_DIR, captions, params.export, store)
    finally:
        store.close()
    return CaptionReport(caption_metrics(len(table), captions, results), computed)
