"""The evaluate stage's work from params to score tables and headline metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pandas as pd

from postertune.atomic import atomic_path
from postertune.evaluate.cmmd import mmd, reference_hashes, reference_loader
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.report import comparison_table, headline_metrics
from postertune.evaluate.samples import MANIFEST, load_sample, read_samples, sample_sha256
from postertune.evaluate.scoring import score_samples
from postertune.evaluate.shared import Embedder
from postertune.evaluate.stats import METRICS, Comparison, compare, summarize
from postertune.launch import launched_processes
from postertune.models.aesthetic import load_aesthetic_head
from postertune.models.clip import check_weights, load_clip
from postertune.params import ParamError
from postertune.store import ShardStore


@dataclass(frozen=True)
class EvaluateReport:
    scores: pd.DataFrame
    summary: pd.DataFrame
    comparisons: dict[str, dict[str, Comparison]]  # other model → metric → result
    metrics: dict


def run(params: EvaluateParams) -> dict | None:
    """Score, summarise and compare; print the per-model summary; return the stage metrics
    (None in a process other than the main one)."""
    report = evaluate(params)
    if report is None:
        return None
    print(report.summary.to_string(index=False))
    return report.metrics


def evaluate(params: EvaluateParams) -> EvaluateReport | None:
    """Check every input first, then score, summarise, compare and write the tables.

    Launched as several processes, each embeds its share of the images; the main process
    does the rest (the others return None)."""
    check_weights(params, "evaluate")
    samples = read_samples(params.samples)
    models = list(dict.fromkeys(samples["model"]))
    if params.candidate not in models:
        raise ParamError(
            "evaluate.candidate",
            f"{params.candidate!r} has no images in {params.samples / MANIFEST} ({', '.join(models)})",
        )
    store = ShardStore(params.cmmd.shards)
    references = (
        reference_hashes(params.cmmd.images, store, params.cmmd.max_images, params.seed) if params.cmmd.enabled else []
    )

    processes = launched_processes()
    clip = load_clip(params, params.torch_device)
    embed = Embedder(clip, params, processes)
    images = embed(
        list(samples["path"]), partial(load_sample, params.samples), partial(sample_sha256, params.samples), "evaluate"
    )
    if references:
        with store:
            background = params.cmmd.background
            real = embed(
                references, reference_loader(store, background), lambda sha: [sha, background], "cmmd reference"
            )
    if not processes.main:
        return None
    if embed.reused:
        print(f"evaluate: {embed.reused} image embeddings reused from the parts of a killed launch")
    head = load_aesthetic_head(params.aesthetic_head, clip.embed_dim, params.seed, params.torch_device)
    scores = score_samples(samples, images, clip, head, params.batch_size)

    summary = summarize(scores)
    comparisons = {
        other: {
            metric: compare(
                scores,
                params.candidate,
                other,
                column,
                params.confidence,
                params.bootstrap_resamples,
                params.paired_test,
                params.seed,
            )
            for metric, column in METRICS.items()
        }
        for other in models
        if other != params.candidate
    }
    cmmd = {}
    if references:
        for model in models:
            own = images[(samples["model"] == model).to_numpy()]
            cmmd[model] = mmd(own, real, params.cmmd.sigma, params.cmmd.scale)
        summary["cmmd"] = summary["model"].map(cmmd)

    for name, frame in (
        ("scores.csv", scores),
        ("summary.csv", summary),
        ("comparisons.csv", comparison_table(params.candidate, comparisons)),
    ):
        with atomic_path(params.output / name) as tmp:
            frame.to_csv(tmp, index=False)
    embed.remove_parts()
    metrics = headline_metrics(summary, params.candidate, comparisons, cmmd)
    return EvaluateReport(scores, summary, comparisons, metrics)
