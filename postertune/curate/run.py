"""The curate stage's work: score the captioned set once per image (cached), select, write.

Writes ``images.parquet`` (the kept rows: every caption column, the scores, the cluster
and the rank in it), ``dropped.parquet`` (the other rows, with ``curate_reason``,
``curate_reasons`` and ``curate_skip``), the embedding cache (``cache/``, kept between
runs) and the plots (``plots/``). With ``enabled: false`` the captioned table passes
through unchanged and nothing is scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from postertune.atomic import write_parquet
from postertune.curate.params import CurateParams
from postertune.curate.plots import write_empty_plots, write_plots
from postertune.curate.report import curate_metrics, disabled_metrics
from postertune.curate.select import select, similarity
from postertune.errors import PipelineError
from postertune.fingerprint import fingerprint_json
from postertune.launch import launched_processes
from postertune.store import ShardStore
from postertune.tables import read_stage_table

REQUIRED_COLUMNS = ("sha256", "caption")
IMAGES, DROPPED, CACHE_DIR, PLOTS_DIR = "images.parquet", "dropped.parquet", "cache", "plots"  # in params.output
SCORE_COLUMNS = [
    "aesthetic_score",
    "clip_similarity",
    "clip_similarity_short",
    "clip_similarity_long",
    "jpeg_quality",
    "pixel_std",
    "cluster",
    "cluster_rank",
]
DROP_COLUMNS = ["curate_reason", "curate_reasons", "curate_skip"]


@dataclass(frozen=True)
class CurateReport:
    kept: pd.DataFrame
    dropped: pd.DataFrame
    metrics: dict


def read_captions(params: CurateParams) -> pd.DataFrame:
    table = read_stage_table(params.captions, REQUIRED_COLUMNS, "caption")
    empty = table["sha256"].isna() | (table["sha256"].astype(str).str.len() == 0)
    if empty.any():
        raise PipelineError(f"{params.captions}: row {int(empty.to_numpy().argmax())}: sha256 is empty")
    return table.reset_index(drop=True)


def run(params: CurateParams) -> dict | None:
    """Curate the captioned set; print what was kept and what ran; return the stage metrics
    (None in a process other than the main one)."""
    report = curate(params)
    if report is None:
        return None
    m = report.metrics
    ran = m["run"]
    print(
        f"curate: kept {m['kept']} of {m['images_in']} captioned images;"
        f" embedded this run: {ran.get('images_embedded', 0)} images, {ran.get('texts_embedded', 0)} captions"
    )
    return m


def curate(params: CurateParams) -> CurateReport | None:
    """Launched as several processes, each scores its share; the main process then reads every
    process's cache parts and writes what one process would (the others return None)."""
    started = time.perf_counter()
    table = read_captions(params)
    processes = launched_processes()
    if not params.enabled:
        if not processes.main:
            return None
        write_parquet(params.output / IMAGES, table)
        dropped = table.iloc[0:0].assign(**{c: pd.Series(dtype=object) for c in DROP_COLUMNS})
        write_parquet(params.output / DROPPED, dropped)
        write_empty_plots(params.output / PLOTS_DIR)
        run = {"seconds": round(time.perf_counter() - started, 3)}
        return CurateReport(table, dropped, disabled_metrics(len(table), run))

    # the model libraries load only when there is something to score
    from postertune.curate.cache import EmbeddingCache
    from postertune.curate.scoring import caption_texts, read_scores, score_pass
    from postertune.models.aesthetic import load_aesthetic_head
    from postertune.models.clip import check_weights, clip_fingerprint, load_clip

    check_weights(params, "curate")
    store = ShardStore(params.shards)
    if len(store) == 0 and len(table):
        raise PipelineError(f"{params.shards}: no image shards to score (run the fetch stage or dvc pull)")
    device = params.torch_device
    # what an embedding depends on: the model, and the colour transparent posters are composited onto
    fingerprint = fingerprint_json([clip_fingerprint(params), list(params.background)])
    about = {"clip_model": params.clip_model, "clip_weights": params.clip_weights}
    cache = EmbeddingCache(params.output / CACHE_DIR, fingerprint, about, processes.suffix)
    loaded = {}

    def model():
        loaded["clip"] = clip = load_clip(params, device)
        # a head that does not fit the model stops the run before any image is encoded
        loaded["head"] = load_aesthetic_head(params.aesthetic_head, clip.embed_dim, params.seed, device)
        return clip

    with store:
        shas = table["sha256"].astype(str).tolist()
        work = score_pass(
            shas,
            caption_texts(table),
            store,
            cache,
            model,
            params.batch_size,
            params.chunk_size,
            params.workers,
            params.max_pixels,
            params.background,
            processes,
        )
        if not processes.main:
            return None
        dim = next((len(r.embedding) for r in cache.images.values() if r.embedding is not None), None)
        if "head" not in loaded and dim is not None:
            loaded["head"] = load_aesthetic_head(params.aesthetic_head, dim, params.seed, device)
        scores, embeddings = read_scores(table, store, cache, loaded.get("head"))
        scores["clip_similarity"] = similarity(scores, params.similarity)
        selection = select(scores, embeddings, table["sha256"], params)

        full = table.copy()
        for column in SCORE_COLUMNS:
            if column in scores.columns:
                full[column] = scores[column]
        full["cluster"] = selection.cluster
        full["cluster_rank"] = selection.rank
        full["kept"] = selection.kept
        full["curate_reason"] = selection.reason
        full["curate_reasons"] = selection.reasons
        full["curate_skip"] = scores["skip"]
        if "source" not in full.columns:
            full["source"] = "all"
        write_plots(
            params.output / PLOTS_DIR,
            full,
            store,
            params.sheet_size,
            params.strip_size,
            params.thumbnail,
            params.background,
        )
    kept = full[full["kept"]].drop(columns=["kept", *DROP_COLUMNS]).reset_index(drop=True)
    dropped = full[~full["kept"]].drop(columns=["kept"]).reset_index(drop=True)
    if "source" not in table.columns:
        kept, dropped = kept.drop(columns="source"), dropped.drop(columns="source")
    write_parquet(params.output / IMAGES, kept)
    write_parquet(params.output / DROPPED, dropped)
    run = {
        "images_embedded": work.images,
        "texts_embedded": work.texts,
        "model_loaded": int(work.model_loaded),
        "seconds": round(time.perf_counter() - started, 3),
    }
    metrics = curate_metrics(full, selection, run)
    return CurateReport(kept, dropped, metrics)
