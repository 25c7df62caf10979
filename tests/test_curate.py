"""The curate stage: one CLIP pass per image (cached), JPEG quality from the quantisation
tables, floors and per-cluster top-k, the kept and dropped tables, metrics and plots."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import postertune.curate.scoring as curate_scoring
import postertune.models.clip as clip_module
from postertune.cli import run_stage
from postertune.curate.params import CurateParams
from postertune.curate.run import curate, run
from postertune.curate.select import RULES, kmeans, select
from postertune.errors import PipelineError
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.run import evaluate
from postertune.jpegquality import estimate_quality, jpeg_quality
from postertune.models.clip import TINY_ARCHITECTURE, TINY_OVERRIDES
from postertune.params import ParamError, build
from postertune.store import ShardWriter, sha256_hex
from tests.pipeline_repo import tool_env
from tests.posters import poster

PROJECT = Path(__file__).resolve().parents[1]
AESTHETIC_HEAD = Path(
    os.environ.get(
        "POSTERTUNE_AESTHETIC_HEAD", PROJECT.parent / "shared" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
    )
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_inputs(root: Path, payloads: list[bytes], extra_rows: int = 0, sources: list[str] | None = None) -> Path:
    """``root/shards`` holding ``payloads`` and ``root/captions.parquet`` as the caption stage
    leaves it: one row per payload, then ``extra_rows`` rows whose image was never stored."""
    with ShardWriter(root / "shards") as writer:
        for data in payloads:
            writer.add(sha256_hex(data), data)
    shas = [sha256_hex(d) for d in payloads] + [f"{i:064x}" for i in range(extra_rows)]
    n = len(shas)
    table = pd.DataFrame(
        {
            "sha256": shas,
            "caption": [f"movie poster, thriller, poster {i}" for i in range(n)],
            "caption_long": [f"A poster for the film number {i}, with a bold title." for i in range(n)],
            "tags": [["movie poster", "thriller"]] * n,
            "source": sources or ["tmdb"] * n,
            "width": [64] * n,
            "height": [96] * n,
        }
    )
    table.to_parquet(root / "captions.parquet", index=False)
    return root


def make_params(root: Path, **overrides) -> CurateParams:
    data = dict(
        captions=str(root / "captions.parquet"),
        shards=str(root / "shards"),
        output=str(root / "curated"),
        device="cpu",
        workers=1,
        min_jpeg_quality=None,
        min_pixel_std=None,
        top_k=None,
        clusters=1,
    )
    data.update(overrides)
    return build(CurateParams, data, "curate")


def scores_frame(aesthetic, similarity=None, quality=None, spread=None, skip=None) -> pd.DataFrame:
    n = len(aesthetic)
    similarity = similarity if similarity is not None else [0.3] * n
    return pd.DataFrame(
        {
            "aesthetic_score": np.asarray(aesthetic, dtype=float),
            "clip_similarity_short": np.asarray(similarity, dtype=float),
            "clip_similarity_long": np.asarray(similarity, dtype=float) - 0.1,
            "jpeg_quality": pd.array(quality if quality is not None else [None] * n, dtype="Int16"),
            "pixel_std": np.asarray(spread if spread is not None else [40.0] * n, dtype=float),
            "skip": skip if skip is not None else [None] * n,
        }
    )


def selection_params(**overrides) -> CurateParams:
    data = dict(min_jpeg_quality=None, min_pixel_std=None, top_k=None, clusters=1)
    data.update(overrides)
    return build(CurateParams, data, "curate")


# --- JPEG quality -----------------------------------------------------------------------


@pytest.mark.parametrize("quality", [50, 75, 95])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_quality_of_pillow_files_is_recovered_within_three(quality, subsampling):
    for image in (poster(3, (200, 300)), poster(4, (120, 180)).convert("L")):
        options = {"quality": quality} | ({"subsampling": subsampling} if image.mode == "RGB" else {})
        estimate = jpeg_quality(Image.open(io.BytesIO(encoded(image, "JPEG", **options))))
        assert estimate is not None and abs(estimate - quality) <= 3, (image.mode, quality, estimate)


def test_jpeg_quality_is_none_for_other_formats_and_tables_in_any_order():
    assert jpeg_quality(Image.open(io.BytesIO(encoded(poster(1))))) is None
    assert jpeg_quality(Image.open(io.BytesIO(encoded(poster(1), "WEBP", quality=50)))) is None
    tables = Image.open(io.BytesIO(encoded(poster(1), "JPEG", quality=75))).quantization
    shuffled = {k: list(np.random.default_rng(k).permutation(v)) for k, v in tables.items()}
    assert estimate_quality(shuffled) == estimate_quality(tables) == 75
    assert estimate_quality({}) is None


# --- selection --------------------------------------------------------------------------


def test_floors_are_inclusive_at_their_boundaries():
    scores = scores_frame(
        aesthetic=[5.0, 4.999, 6.0, 6.0, 6.0, 6.0, 6.0],
        similarity=[0.3, 0.3, 0.25, 0.2499, 0.3, 0.3, 0.3],
        quality=[70, 70, 70, 70, 69, None, 80],
        spread=[5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 4.99],
    )
    params = selection_params(min_aesthetic=5.0, min_clip_similarity=0.25, min_jpeg_quality=70, min_pixel_std=5.0)
    chosen = select(scores, np.eye(7, 4), pd.Series([f"{i:064x}" for i in range(7)]), params)
    assert chosen.kept.tolist() == [True, False, True, False, False, True, False]
    assert chosen.reason == [None, "low_aesthetic", None, "low_clip_similarity", "low_jpeg_quality", None, "near_blank"]
    # the similarity floor reads the better of the two captions unless told otherwise (long: short - 0.1 here)
    long_only = select(
        scores, np.eye(7, 4), pd.Series(range(7)), selection_params(min_clip_similarity=0.16, similarity="long")
    )
    assert long_only.kept.tolist() == [True, True, False, False, True, True, True]
    # several failures are all listed; the first in rule order is the reason
    both = select(scores_frame([1.0], [0.0], [10]), np.eye(1, 4), pd.Series(["a"]), params)
    assert both.reasons == [["low_jpeg_quality", "low_aesthetic", "low_clip_similarity"]]
    # no floor set: nothing dropped
    assert select(scores, np.eye(7, 4), pd.Series(range(7)), selection_params()).kept.all()


def two_clusters(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings in two tight, well-separated groups; the first group scores higher."""
    rng = np.random.default_rng(seed)
    a = np.eye(1, 16, 0) + 0.01 * rng.normal(size=(n, 16))
    b = np.eye(1, 16, 1) + 0.01 * rng.normal(size=(n, 16))
    embeddings = np.concatenate([a, b])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    aesthetic = np.concatenate([7.0 + 0.1 * rng.random(n), 4.0 + 0.1 * rng.random(n)])
    return embeddings.astype(np.float32), aesthetic


def test_per_cluster_top_k_keeps_both_clusters_and_overall_top_k_does_not():
    embeddings, aesthetic = two_clusters()
    shas = pd.Series([f"{i:064x}" for i in range(len(aesthetic))])
    scores = scores_frame(aesthetic)
    overall = select(scores, embeddings, shas, selection_params(top_k=6, clusters=1))
    assert set(np.flatnonzero(overall.kept)) == set(np.argsort(-aesthetic)[:6])
    assert overall.kept[:10].sum() == 6 and overall.kept[10:].sum() == 0

    shared = select(scores, embeddings, shas, selection_params(top_k=6, clusters=2))
    assert set(shared.cluster[:10]) != set(shared.cluster[10:])  # the two groups are the two clusters
    assert shared.kept[:10].sum() == 3 and shared.kept[10:].sum() == 3
    for group in (slice(0, 10), slice(10, 20)):  # each cluster keeps its own best
        best = np.argsort(-aesthetic[group])[:3]
        assert np.flatnonzero(shared.kept[group]).tolist() == sorted(best.tolist())
    assert sorted(set(shared.reason) - {None}) == ["top_k"]
    # deterministic for a seed
    again = select(scores, embeddings, shas, selection_params(top_k=6, clusters=2))
    assert np.array_equal(again.kept, shared.kept) and np.array_equal(again.cluster, shared.cluster)


def test_a_small_cluster_leaves_its_slots_to_the_others():
    embeddings, aesthetic = two_clusters()
    keep = np.r_[0:10, 10:12]  # cluster b has only two images
    scores = scores_frame(aesthetic[keep])
    chosen = select(scores, embeddings[keep], pd.Series(range(12)).astype(str), selection_params(top_k=8, clusters=2))
    assert chosen.kept.sum() == 8 and chosen.kept[10:].all()
    # floors come first: a cluster whose images fail them gets nothing
    floored = select(
        scores,
        embeddings[keep],
        pd.Series(range(12)).astype(str),
        selection_params(top_k=8, clusters=2, min_aesthetic=5),
    )
    assert floored.kept.sum() == 8 and not floored.kept[10:].any()
    assert floored.reason[10:] == ["low_aesthetic", "low_aesthetic"]


def test_kmeans_is_seeded_and_labels_do_not_depend_on_row_order():
    embeddings, _ = two_clusters(20, seed=1)
    labels = kmeans(embeddings, 2, seed=3)
    assert np.array_equal(labels, kmeans(embeddings, 2, seed=3))
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] == 0 and labels[20] == 1
    assert kmeans(embeddings[:3], 5, seed=0).tolist() == [0, 1, 2]  # never more clusters than points
    assert kmeans(embeddings, 1, seed=0).tolist() == [0] * 40


def test_selection_params_are_checked_before_anything_runs():
    with pytest.raises(ParamError) as err:
        build(CurateParams, dict(top_k=None, clusters=4), "curate")
    assert err.value.name == "curate.clusters"
    with pytest.raises(ParamError, match="must be at least clusters") as err:
        build(CurateParams, dict(top_k=3, clusters=4), "curate")
    assert err.value.name == "curate.top_k"
    with pytest.raises(ParamError, match="must be at least 1 and at most 100") as err:
        build(CurateParams, dict(min_jpeg_quality=101), "curate")
    assert err.value.name == "curate.min_jpeg_quality"
    with pytest.raises(ParamError) as err:
        build(CurateParams, dict(clip_model="ViT-L-14-quickgelu", clip_weights="openai"), "curate")
    assert err.value.name == "curate.aesthetic_head"


# --- the stage ----------------------------------------------------------------------------


def test_stage_writes_kept_and_dropped_with_every_reason(tmp_path):
    payloads = [encoded(poster(i), "JPEG", quality=q) for i, q in enumerate([90, 85, 40, 95, 92])]
    payloads += [encoded(poster(9, blank=True)), b"<html>not a poster</html>"]
    root = write_inputs(tmp_path, payloads, extra_rows=1)
    report = curate(make_params(root, min_jpeg_quality=50, min_pixel_std=1.0, top_k=3))

    kept = pd.read_parquet(root / "curated/images.parquet")
    dropped = pd.read_parquet(root / "curated/dropped.parquet")
    assert len(kept) == 3 and len(dropped) == 5
    reasons = dict(zip(dropped["sha256"], dropped["curate_reason"], strict=True))
    assert reasons[sha256_hex(payloads[2])] == "low_jpeg_quality"
    assert reasons[sha256_hex(payloads[5])] == "near_blank"
    assert reasons[sha256_hex(payloads[6])] == "unreadable_image"
    assert reasons[f"{0:064x}"] == "missing_image"
    assert list(reasons.values()).count("top_k") == 1
    skip = dict(zip(dropped["sha256"], dropped["curate_skip"], strict=True))
    assert skip[sha256_hex(payloads[6])] == "unreadable: not_an_image"
    # the kept table is what train reads: every caption column, then the scores
    assert {"caption", "caption_long", "width", "height", "aesthetic_score", "cluster"} <= set(kept.columns)
    saved_at = {sha256_hex(payloads[i]): q for i, q in enumerate([90, 85, 40, 95, 92])}
    for sha, quality in zip(kept["sha256"], kept["jpeg_quality"], strict=True):
        assert abs(quality - saved_at[sha]) <= 3
    metrics = report.metrics
    assert metrics["images_in"] == 8 and metrics["scored"] == 6 and metrics["kept"] == 3
    assert metrics["dropped_by_rule"] == {
        "missing_image": 1,
        "unreadable_image": 1,
        "low_jpeg_quality": 1,
        "near_blank": 1,
        "low_aesthetic": 0,
        "low_clip_similarity": 0,
        "top_k": 1,
    }
    assert set(metrics["dropped_by_rule"]) == set(RULES)
    assert metrics["before"]["aesthetic"]["count"] == 6 and metrics["after"]["aesthetic"]["count"] == 3
    assert metrics["after"]["jpeg_quality"]["min"] >= 50
    assert metrics["per_source"]["tmdb"]["kept"] == 3
    # plots: histograms of all scored against kept, one sheet each for best and worst, a strip per cluster
    plots = pd.read_csv(root / "curated/plots/scores.csv")
    assert (plots["set"] == "all").sum() == 6 and (plots["set"] == "kept").sum() == 3
    sheets = sorted(p.name for p in (root / "curated/plots/sheets").iterdir())
    assert sheets == ["cluster-000.png", "source-tmdb-best.png", "source-tmdb-worst.png"]
    assert Image.open(root / "curated/plots/sheets/source-tmdb-best.png").width == 6 * 128


def test_disabled_passes_the_whole_captioned_set_through_without_a_model(tmp_path, monkeypatch):
    root = write_inputs(tmp_path, [encoded(poster(i)) for i in range(3)], extra_rows=1)

    def no_model(*args, **kwargs):
        raise AssertionError("curation is off: no model may load")

    monkeypatch.setattr(clip_module, "load_clip", no_model)
    report = curate(make_params(root, enabled=False, min_aesthetic=100.0))
    pd.testing.assert_frame_equal(
        pd.read_parquet(root / "curated/images.parquet"), pd.read_parquet(root / "captions.parquet")
    )
    assert pd.read_parquet(root / "curated/dropped.parquet").empty
    assert report.metrics["enabled"] == 0 and report.metrics["kept"] == 4


def test_embedding_cache_is_reused_a_rerun_with_new_thresholds_calls_no_model(tmp_path, monkeypatch):
    root = write_inputs(tmp_path, [encoded(poster(i), "JPEG", quality=80 + i) for i in range(6)])
    first = curate(make_params(root, top_k=4, clusters=2))
    assert first.metrics["run"]["images_embedded"] == 6 and first.metrics["run"]["model_loaded"] == 1
    before = pd.concat([first.kept, first.dropped]).set_index("sha256").sort_index()

    def no_model(*args, **kwargs):
        raise AssertionError("the cache holds every embedding: no model may load")

    monkeypatch.setattr(clip_module, "load_clip", no_model)
    median = float(before["aesthetic_score"].median())
    second = curate(make_params(root, min_aesthetic=median, top_k=None, clusters=1, min_jpeg_quality=83))
    assert second.metrics["run"] == {
        **second.metrics["run"],
        "images_embedded": 0,
        "texts_embedded": 0,
        "model_loaded": 0,
    }
    after = pd.concat([second.kept, second.dropped]).set_index("sha256").sort_index()
    for column in ("aesthetic_score", "clip_similarity_short", "clip_similarity_long", "jpeg_quality"):
        pd.testing.assert_series_equal(after[column], before[column])
    expected = (before["aesthetic_score"] >= median) & (before["jpeg_quality"] >= 83)
    assert set(second.kept["sha256"]) == set(before.index[expected])

    # one new poster: only it is embedded (and the model loads for it alone)
    monkeypatch.undo()
    write_inputs(tmp_path, [encoded(poster(i), "JPEG", quality=80 + i) for i in range(7)])
    third = curate(make_params(root))
    assert third.metrics["run"]["images_embedded"] == 1 and third.metrics["run"]["texts_embedded"] == 2


def test_an_interrupted_run_keeps_what_it_scored(tmp_path, monkeypatch):
    root = write_inputs(tmp_path, [encoded(poster(i)) for i in range(6)])
    real = curate_scoring.ClipEncoder.encode_images
    calls = []

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(curate_scoring.ClipEncoder, "encode_images", failing)
    with pytest.raises(KeyboardInterrupt):
        curate(make_params(root, chunk_size=2, batch_size=2))
    monkeypatch.undo()
    resumed = curate(make_params(root, chunk_size=2, batch_size=2))
    assert resumed.metrics["run"]["images_embedded"] == 4
    assert resumed.metrics["scored"] == 6


def test_bad_inputs_stop_with_one_line_naming_the_param_or_file(tmp_path, monkeypatch, capsys):
    root = write_inputs(tmp_path, [encoded(poster(1))])
    missing = tmp_path / "no-such-clip.safetensors"
    section = {
        "captions": str(root / "captions.parquet"),
        "shards": str(root / "shards"),
        "output": str(root / "curated"),
        "clip_weights": str(missing),
        "device": "cpu",
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"curate": section}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_stage("curate", CurateParams, run)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"curate: error: param curate.clip_weights: {missing} does not exist"
    ]

    head = tmp_path / "no-head.pth"
    with pytest.raises(ParamError, match=f"{head} does not exist") as err:
        curate(make_params(root, aesthetic_head=str(head)))
    assert err.value.name == "curate.aesthetic_head"
    with pytest.raises(PipelineError, match=r"gone.parquet: file not found \(run the caption stage first\)"):
        curate(make_params(root, captions=str(tmp_path / "gone.parquet")))
    empty = tmp_path / "empty-shards"
    with pytest.raises(PipelineError, match="no image shards to score"):
        curate(make_params(root, shards=str(empty)))
    assert not (root / "curated/images.parquet").exists()  # nothing written before the checks pass


# --- one code path with the evaluate stage -------------------------------------------------


def wide_tiny_clip(folder: Path) -> Path:
    """An open_clip folder: the tiny CLIP with 768-wide embeddings, so the published head fits."""
    config = {**open_clip.get_model_config(TINY_ARCHITECTURE), **TINY_OVERRIDES, "embed_dim": 768}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_ARCHITECTURE, **{**TINY_OVERRIDES, "embed_dim": 768})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return folder


@pytest.mark.skipif(
    not AESTHETIC_HEAD.is_file(), reason="the published LAION aesthetic head is not beside the repository"
)
def test_curate_aesthetic_scores_equal_the_evaluate_stages_for_the_same_images(tmp_path):
    clip = wide_tiny_clip(tmp_path / "clip")
    images = [poster(i, (80, 120)) for i in range(8)]
    payloads = [encoded(image) for image in images]
    root = write_inputs(tmp_path, payloads)
    # the same files as sampled images: two models, two prompts, two seeds
    samples = tmp_path / "samples"
    rows = []
    for i, data in enumerate(payloads):
        model, prompt, seed = ("finetuned", "base")[i // 4], ("a", "b")[(i // 2) % 2], i % 2
        path = f"images/{model}/{prompt}/seed-{seed}.png"
        (samples / path).parent.mkdir(parents=True, exist_ok=True)
        (samples / path).write_bytes(data)
        rows.append(
            dict(model=model, prompt_id=prompt, prompt=f"poster {prompt}", seed=seed, path=path, sha=sha256_hex(data))
        )
    pd.DataFrame(rows).drop(columns="sha").to_csv(samples / "manifest.csv", index=False)

    models = dict(clip_model="tiny", clip_weights=str(clip), aesthetic_head=str(AESTHETIC_HEAD))
    curated = curate(make_params(root, **models))
    evaluated = evaluate(
        build(
            EvaluateParams,
            dict(
                samples=str(samples),
                output=str(tmp_path / "eval"),
                device="cpu",
                cmmd={"enabled": False},
                bootstrap_resamples=100,
                **models,
            ),
            "evaluate",
        )
    )
    ours = curated.kept.set_index("sha256")["aesthetic_score"]
    theirs = pd.Series(evaluated.scores["aesthetic_score"].to_numpy(), index=[r["sha"] for r in rows])
    assert len(ours) == 8
    np.testing.assert_allclose(ours[theirs.index].to_numpy(), theirs.to_numpy(), rtol=0, atol=1e-6)
    assert ours.std() > 0  # the published head tells these posters apart, even on a random encoder


# --- under DVC ----------------------------------------------------------------------------


@pytest.mark.slow
def test_stage_runs_from_params_yaml_and_its_plots_show_in_dvc(tmp_path):
    """``python -m stages.curate`` with the demo's params, then ``dvc plots show`` on the plots
    dvc.yaml declares: three histograms of all against kept, the contact sheets as images."""
    sources = ["tmdb"] * 5 + ["myanimelist"] * 4
    write_inputs(tmp_path, [encoded(poster(i), "JPEG", quality=60 + 4 * i) for i in range(9)], sources=sources)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())["curate"]
    params |= {"captions": "captions.parquet", "shards": "shards", "output": "data/curated", "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"curate": params}))
    env = tool_env(PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "stages.curate"], cwd=tmp_path, env=env, check=True, capture_output=True)
    metrics = json.loads((tmp_path / "metrics/curate.json").read_text())
    assert metrics["kept"] == params["top_k"] and set(metrics["per_source"]) == {"tmdb", "myanimelist"}

    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, check=True, env=env, cwd=tmp_path)
    (tmp_path / ".dvc/plots").mkdir(exist_ok=True)
    shutil.copy(PROJECT / ".dvc/plots/score_histogram.json", tmp_path / ".dvc/plots/score_histogram.json")
    declared = [p for p in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"] if "curate" in str(p)]
    text = yaml.safe_dump({"plots": declared}).replace("${curate.output}", "data/curated")
    (tmp_path / "dvc.yaml").write_text(text)
    shown = subprocess.run(
        ["dvc", "plots", "show", "--json"], check=True, env=env, cwd=tmp_path, capture_output=True, text=True
    )
    plots = json.loads(shown.stdout)["data"]
    sheets = sorted(name for name, entries in plots.items() if entries[0]["type"] == "image")
    assert sheets == [
        f"data/curated/plots/sheets/{name}.png"
        for name in (
            "cluster-000",
            "cluster-001",
            "source-myanimelist-best",
            "source-myanimelist-worst",
            "source-tmdb-best",
            "source-tmdb-worst",
        )
    ]
    for name in ("curate_aesthetic_histogram", "curate_clip_similarity_histogram", "curate_jpeg_quality_histogram"):
        spec = plots[name][0]["content"]
        assert {d["set"] for d in spec["data"]["values"]} == {"all", "kept"}
        assert spec["spec"]["encoding"]["x"]["bin"] and spec["spec"]["encoding"]["color"]["title"] == "set"
