"""The evaluate stage: CLIP and aesthetic scores, the guide's summary, paired comparisons, CMMD.

Scores come from the tiny random open_clip model (offline); the published LAION head is
checked against plain matrix products when its file is beside the repository.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from scipy import stats

from postertune.cli import run_stage
from postertune.errors import PipelineError
from postertune.evaluate.cmmd import mmd
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.run import evaluate, run
from postertune.evaluate.samples import load_sample
from postertune.evaluate.scoring import embed_images, score_samples
from postertune.evaluate.stats import bootstrap_interval, compare, paired_p_value, summarize, win_rate
from postertune.models.aesthetic import load_aesthetic_head
from postertune.models.clip import TINY_ARCHITECTURE, TINY_OVERRIDES, check_weights, load_clip
from postertune.models.tiny import save_tiny_pipeline
from postertune.params import ParamError, build
from postertune.sample.params import SampleParams
from postertune.sample.run import sample
from postertune.store import ShardWriter, sha256_hex
from tests.pipeline_repo import tool_env
from tests.posters import poster

PROJECT = Path(__file__).resolve().parents[1]
AESTHETIC_HEAD = Path(
    os.environ.get(
        "POSTERTUNE_AESTHETIC_HEAD", PROJECT.parent / "shared" / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
    )
)
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_params(samples: Path, out: Path | None = None, **overrides) -> EvaluateParams:
    data = dict(
        samples=str(samples),
        clip_model="tiny",
        clip_weights=None,
        bootstrap_resamples=1000,
        device="cpu",
        output=str(out or samples.parent / "eval"),
        cmmd={"enabled": False},
    )
    data.update(overrides)
    return build(EvaluateParams, data, "evaluate")


def write_samples(folder: Path, rows: list[dict]) -> Path:
    """A samples folder as the sample stage leaves it: PNGs and manifest.csv."""
    for row in rows:
        path = folder / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        poster(row["image_seed"]).save(path)
    pd.DataFrame(rows).drop(columns="image_seed").to_csv(folder / "manifest.csv", index=False)
    return folder


def sample_rows(models=("finetuned", "base"), prompts=("pet_bag", "mecha_anime"), seeds=(0, 1)) -> list[dict]:
    texts = {"pet_bag": "a cat in a travel bag, product poster", "mecha_anime": "anime poster of a giant robot"}
    return [
        dict(
            model=m,
            prompt_id=p,
            prompt=texts[p],
            seed=s,
            path=f"images/{m}/{p}/seed-{s}.png",
            image_seed=100 * i + 10 * j + s,
        )
        for i, m in enumerate(models)
        for j, p in enumerate(prompts)
        for s in seeds
    ]


def scores_frame(values: dict[str, dict[str, list[float]]], prompts: list[str], seeds: list[int]) -> pd.DataFrame:
    rows = []
    for model, columns in values.items():
        pairs = [(p, s) for p in prompts for s in seeds]
        for k, (p, s) in enumerate(pairs):
            rows.append(dict(model=model, prompt_id=p, seed=s, **{name: column[k] for name, column in columns.items()}))
    return pd.DataFrame(rows)


# --- the guide's summary ---------------------------------------------------------------


def test_summary_equals_pandas_and_scipy_computed_independently():
    a_aes = [4.1, 5.3, 6.0, 5.5, 4.8, 7.2, 3.9, 6.6]
    b_aes = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]
    a_clip = [0.21, 0.25, 0.30, 0.19, 0.27, 0.22, 0.24, 0.26]
    b_clip = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]
    scores = scores_frame(
        {
            "finetuned": {"aesthetic_score": a_aes, "clip_score": a_clip},
            "base": {"aesthetic_score": b_aes, "clip_score": b_clip},
        },
        ["p1", "p2", "p3", "p4"],
        [0, 1],
    )
    summary = summarize(scores).set_index("model")
    assert list(summary.index) == ["finetuned", "base"]
    for model, aes, clip in [("finetuned", a_aes, a_clip), ("base", b_aes, b_clip)]:
        described = pd.Series(aes).describe()
        row = summary.loc[model]
        assert row["aesthetic_count"] == len(aes)
        for ours, theirs in [
            ("aesthetic_mean", "mean"),
            ("aesthetic_std", "std"),
            ("aesthetic_min", "min"),
            ("aesthetic_p25", "25%"),
            ("aesthetic_median", "50%"),
            ("aesthetic_p75", "75%"),
            ("aesthetic_max", "max"),
        ]:
            assert row[ours] == pytest.approx(described[theirs]), ours
        assert row["aesthetic_skew"] == pytest.approx(stats.skew(aes, bias=True))
        assert row["aesthetic_kurtosis"] == pytest.approx(stats.kurtosis(aes, fisher=True, bias=True))
        assert row["clip_score_mean"] == pytest.approx(np.mean(clip))
        assert row["clip_score_std"] == pytest.approx(np.std(clip))
    # by hand for 1,2,3,4 (twice): sample std for the aesthetic score, population std for CLIP
    base = summary.loc["base"]
    assert base["aesthetic_std"] == pytest.approx(np.sqrt(10 / 7))
    assert base["clip_score_std"] == pytest.approx(np.sqrt(1.25))
    assert base["aesthetic_skew"] == pytest.approx(0.0)
    assert base["aesthetic_kurtosis"] == pytest.approx(-1.36)
    assert base["aesthetic_p25"] == pytest.approx(1.75)


# --- comparisons ------------------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    assert win_rate(np.array([1.0, 2.0, -1.0, 0.0])) == pytest.approx(0.625)
    assert win_rate(np.array([0.5, 0.1])) == 1.0
    assert win_rate(np.array([-0.5, -0.1])) == 0.0


def test_bootstrap_interval_known_answers():
    # constant differences: no spread to resample
    assert bootstrap_interval(np.full(6, 0.25), 0.95, 1000, 0) == (0.25, 0.25)
    # two prompts, 0 and 1: resampled means are 0, 0.5 or 1 with chances 1/4, 1/2, 1/4
    assert bootstrap_interval(np.array([0.0, 1.0]), 0.95, 4000, 0) == (0.0, 1.0)
    assert bootstrap_interval(np.array([0.0, 1.0]), 0.40, 4000, 0) == (0.5, 0.5)
    # many prompts: close to the normal interval mean ± 1.96·s/√n, and the same for the same seed
    draws = np.random.default_rng(7).normal(0.3, 1.0, 400)
    low, high = bootstrap_interval(draws, 0.95, 5000, 1)
    half = 1.96 * draws.std(ddof=1) / np.sqrt(len(draws))
    assert low == pytest.approx(draws.mean() - half, abs=0.02)
    assert high == pytest.approx(draws.mean() + half, abs=0.02)
    assert bootstrap_interval(draws, 0.95, 5000, 1) == (low, high)
    assert np.isnan(bootstrap_interval(np.array([1.0]), 0.95, 1000, 0)).all()


def test_comparison_resamples_prompts_not_images():
    """Prompt A: the models tie on all 50 seeds; prompt B: the candidate wins by 1 on all.
    Resampling prompts gives [0, 1]; resampling images would give a narrow band near 0.5."""
    seeds = list(range(50))
    other = [0.0] * 100
    candidate = [0.0] * 50 + [1.0] * 50
    scores = scores_frame(
        {"finetuned": {"aesthetic_score": candidate}, "base": {"aesthetic_score": other}}, ["a", "b"], seeds
    )
    result = compare(scores, "finetuned", "base", "aesthetic_score", 0.95, 4000, "wilcoxon", 0)
    assert result.diff == pytest.approx(0.5)
    assert (result.ci_low, result.ci_high) == (0.0, 1.0)
    assert result.win_rate == pytest.approx(0.75)
    assert (result.pairs, result.prompts) == (100, 2)


def test_paired_tests_exact_p_values():
    # six prompts, all in the candidate's favour: 2 of 2^6 sign patterns are as extreme
    diffs = np.array([0.3, 0.1, 0.5, 0.2, 0.6, 0.4])
    assert paired_p_value(diffs, "wilcoxon", 1000, 0) == pytest.approx(2 / 64)
    assert paired_p_value(diffs, "permutation", 1000, 0) == pytest.approx(2 / 64)
    assert paired_p_value(np.zeros(5), "wilcoxon", 1000, 0) == 1.0
    balanced = np.array([1.0, -1.0, 2.0, -2.0])
    assert paired_p_value(balanced, "permutation", 1000, 0) == pytest.approx(1.0)


def test_comparison_pairs_on_prompt_and_seed():
    scores = scores_frame(
        {"finetuned": {"clip_score": [0.3, 0.4, 0.5, 0.6]}, "base": {"clip_score": [0.1, 0.5, 0.2, 0.6]}},
        ["a", "b"],
        [0, 1],
    )
    result = compare(
        scores.sample(frac=1, random_state=3), "finetuned", "base", "clip_score", 0.95, 1000, "wilcoxon", 0
    )
    assert result.diff == pytest.approx(np.mean([0.2, -0.1, 0.3, 0.0]))
    assert result.win_rate == pytest.approx((2 + 0.5) / 4)
    with pytest.raises(PipelineError, match="share no"):
        compare(scores, "finetuned", "other", "clip_score", 0.95, 1000, "wilcoxon", 0)


# --- CMMD -------------------------------------------------------------------------------


def test_cmmd_known_values():
    # one point each, distance d: k(x,x) = k(y,y) = 1, k(x,y) = exp(-d²/2σ²)
    assert mmd(np.zeros((1, 3)), np.array([[3.0, 4.0, 0.0]])) == pytest.approx(1000 * (2 - 2 * np.exp(-25 / 200)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(7, 4)) + 2.0
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-9)

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * 10.0**2))

    direct = (
        np.mean([k(a, b) for a in x for b in x])
        + np.mean([k(a, b) for a in y for b in y])
        - 2 * np.mean([k(a, b) for a in x for b in y])
    )
    assert mmd(x, y) == pytest.approx(1000 * direct)
    assert mmd(x, y + 5.0) > mmd(x, y)


# --- CLIP and aesthetic scores ------------------------------------------------------------


def test_clip_score_is_the_cosine_of_the_normalised_embeddings(tmp_path):
    long_prompt = "a poster of a cat in a travel bag, " * 30
    rows = sample_rows()
    rows[0]["prompt"] = rows[1]["prompt"] = long_prompt
    folder = write_samples(tmp_path / "samples", rows)
    params = make_params(folder)
    clip = load_clip(params, "cpu")
    head = load_aesthetic_head(None, clip.embed_dim, 0, "cpu")
    samples = pd.read_csv(folder / "manifest.csv")
    embeddings = embed_images(clip, list(samples["path"]), lambda p: load_sample(folder, p), 3, "evaluate")
    scores = score_samples(samples, embeddings, clip, head, batch_size=3)

    model, preprocess = clip.model, clip.preprocess
    tokens = open_clip.get_tokenizer(TINY_ARCHITECTURE)
    with torch.no_grad():
        for i, row in samples.iterrows():
            image = model.encode_image(preprocess(Image.open(folder / row["path"]).convert("RGB"))[None])
            text = model.encode_text(tokens([row["prompt"]]))
            a, b = image.numpy()[0].astype(np.float64), text.numpy()[0].astype(np.float64)
            cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert scores.loc[i, "clip_score"] == pytest.approx(cosine, abs=1e-5)
            assert scores.loc[i, "clip_score_100"] == pytest.approx(100 * cosine, abs=1e-3)
            assert np.linalg.norm(embeddings[i]) == pytest.approx(1.0, abs=1e-5)
    # text past the 77-token context is cut, not an error: more words change nothing
    longer = clip.encode_texts([long_prompt, long_prompt + " with a bicycle at sunset"])
    np.testing.assert_allclose(longer[0], longer[1], atol=1e-6)
    assert scores["aesthetic_score"].nunique() == len(scores)


@pytest.mark.skipif(
    not AESTHETIC_HEAD.is_file(), reason="the published LAION aesthetic head is not beside the repository"
)
def test_aesthetic_head_reproduces_the_published_weights_by_plain_matrix_products():
    assert hashlib.sha256(AESTHETIC_HEAD.read_bytes()).hexdigest() == AESTHETIC_HEAD_SHA256
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    x = np.random.default_rng(0).normal(size=(16, 768))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = x
    for i in (0, 2, 4, 6, 7):
        weight = state[f"layers.{i}.weight"].double().numpy()
        bias = state[f"layers.{i}.bias"].double().numpy()
        expected = expected @ weight.T + bias
    head = load_aesthetic_head(AESTHETIC_HEAD, 768, 0, "cpu")
    scores = head.score(x.astype(np.float32))
    np.testing.assert_allclose(scores, expected[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(head.score(x.astype(np.float32)), scores)  # dropout is off


class Payload:
    """Not a tensor: a weights-only load must refuse to rebuild it."""


def test_aesthetic_head_file_errors_name_the_file(tmp_path):
    narrow = tmp_path / "narrow.pth"
    torch.save(load_aesthetic_head(None, 32, 0, "cpu").state_dict(), narrow)
    with pytest.raises(PipelineError) as err:
        load_aesthetic_head(narrow, 768, 0, "cpu")
    assert str(err.value) == f"{narrow}: head takes 32-wide embeddings but the CLIP model gives 768"

    pickled = tmp_path / "pickled.pth"
    torch.save({"layers.0.weight": Payload()}, pickled)
    with pytest.raises(PipelineError, match=rf"^{pickled}: not a loadable weights file"):
        load_aesthetic_head(pickled, 768, 0, "cpu")

    same = [load_aesthetic_head(None, 32, 5, "cpu").layers[0].weight for _ in range(2)]
    assert torch.equal(same[0], same[1])


def test_clip_weights_load_from_a_file_and_an_open_clip_folder(tmp_path):
    image, texts = [poster(1)], ["a movie poster", "a product poster"]
    random = load_clip(make_params(tmp_path, clip_model="tiny", seed=3), "cpu")
    expected = random.encode_images(image), random.encode_texts(texts)

    weights = tmp_path / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, weights)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    shutil.copy(weights, folder / "open_clip_model.safetensors")
    config = {**open_clip.get_model_config(TINY_ARCHITECTURE), **TINY_OVERRIDES}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))

    for source in (weights, folder):
        loaded = load_clip(make_params(tmp_path, clip_model="tiny", clip_weights=str(source), seed=9), "cpu")
        np.testing.assert_allclose(loaded.encode_images(image), expected[0], atol=1e-5)
        np.testing.assert_allclose(loaded.encode_texts(texts), expected[1], atol=1e-5)
    other = load_clip(make_params(tmp_path, clip_model="tiny", seed=9), "cpu")
    assert not np.allclose(other.encode_texts(texts), expected[1], atol=1e-3)


# --- bad input ----------------------------------------------------------------------------


def test_openai_weights_on_a_gelu_model_are_refused():
    with pytest.raises(ParamError, match="QuickGELU: use ViT-L-14-quickgelu") as err:
        build(EvaluateParams, dict(clip_model="ViT-L-14", clip_weights="openai", aesthetic_head="h.pth"), "evaluate")
    assert err.value.name == "evaluate.clip_model"
    with pytest.raises(ParamError) as err:
        build(EvaluateParams, dict(clip_model="ViT-L-14-quickgelu", clip_weights="openai"), "evaluate")
    assert err.value.name == "evaluate.aesthetic_head"


def test_missing_weights_and_unknown_tags_name_the_parameter(tmp_path):
    head = tmp_path / "missing.pth"
    params = make_params(tmp_path, clip_model="ViT-L-14-quickgelu", clip_weights="openai", aesthetic_head=str(head))
    with pytest.raises(ParamError, match=f"{head} does not exist") as err:
        check_weights(params, "evaluate")
    assert err.value.name == "evaluate.aesthetic_head"
    head.write_bytes(b"")
    params = make_params(tmp_path, clip_model="ViT-L-14-quickgelu", clip_weights="laion9b", aesthetic_head=str(head))
    with pytest.raises(ParamError, match="'laion9b' is no file or folder here, nor a pretrained tag") as err:
        check_weights(params, "evaluate")
    assert err.value.name == "evaluate.clip_weights"


def test_empty_samples_folder_stops_the_stage_with_one_line(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "samples"
    empty.mkdir()
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"evaluate": dict(samples=str(empty), clip_model="tiny", clip_weights=None)})
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_stage("evaluate", EvaluateParams, run)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"evaluate: error: {empty}: no sample images (manifest.csv missing)"
    ]
    pd.DataFrame(columns=["model", "prompt_id", "prompt", "seed", "path"]).to_csv(empty / "manifest.csv", index=False)
    with pytest.raises(PipelineError, match=rf"^{empty}: no sample images \(manifest.csv lists none\)$"):
        evaluate(make_params(empty))


def test_missing_or_corrupt_sample_image_is_named(tmp_path):
    folder = write_samples(tmp_path / "samples", sample_rows())
    missing = folder / "images/base/pet_bag/seed-1.png"
    missing.unlink()
    with pytest.raises(PipelineError, match=rf"^{missing}: image listed in manifest.csv is missing$"):
        evaluate(make_params(folder))
    missing.write_bytes(b"<html>not a poster</html>")
    with pytest.raises(PipelineError, match=rf"^{missing}: unreadable image \(not_an_image\)$"):
        evaluate(make_params(folder))


def test_candidate_must_have_images(tmp_path):
    folder = write_samples(tmp_path / "samples", sample_rows())
    with pytest.raises(ParamError, match="'sdxl-poster' has no images") as err:
        evaluate(make_params(folder, candidate="sdxl-poster"))
    assert err.value.name == "evaluate.candidate"


# --- end to end -------------------------------------------------------------------------


def reference_posters(root: Path, count: int) -> tuple[Path, Path]:
    """Real-poster stand-ins as the data stages leave them: shards + a filtered table."""
    hashes = []
    with ShardWriter(root / "shards") as writer:
        for i in range(count):
            buffer = io.BytesIO()
            poster(1000 + i, (96, 144)).save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
            writer.add(sha256_hex(data), data)
            hashes.append(sha256_hex(data))
    table = root / "images.parquet"
    pd.DataFrame({"sha256": hashes, "title": [f"poster {i}" for i in range(count)]}).to_parquet(table)
    return table, root / "shards"


@pytest.mark.slow
def test_sample_then_evaluate_writes_scores_metrics_and_dvc_plots(tmp_path, monkeypatch):
    base = save_tiny_pipeline(tmp_path / "models/base", seed=0)
    tuned = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tuned.save_pretrained(tmp_path / "models/unet")
    (tmp_path / "models/text_encoders").mkdir()  # as the train stage leaves it when no encoder trains
    table, shards = reference_posters(tmp_path / "real", 6)

    project_params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    sample_params = {**project_params["sample"], "device": "cpu", "steps": 2, "width": 64, "height": 64}
    sample_params["models"] = [m for m in sample_params["models"] if m["name"] in ("finetuned", "base")]
    evaluate_params = {
        **project_params["evaluate"],
        "device": "cpu",
        "bootstrap_resamples": 1000,
        "cmmd": {**project_params["evaluate"]["cmmd"], "images": str(table), "shards": str(shards)},
    }
    shutil.copytree(PROJECT / "data/prompts", tmp_path / "data/prompts")
    monkeypatch.chdir(tmp_path)
    report = sample(build(SampleParams, sample_params, "sample"))
    assert report.images == 16
    # both sections: the stage reads its own, dvc.yaml's plots template paths from both
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sample": sample_params, "evaluate": evaluate_params}))
    run_stage("evaluate", EvaluateParams, run)

    scores = pd.read_csv("data/eval/scores.csv")
    assert len(scores) == 16 and set(scores["model"]) == {"finetuned", "base"}
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    for model in ("finetuned", "base"):
        assert {"aesthetic_mean", "aesthetic_median", "aesthetic_kurtosis", "clip_score_mean", "cmmd"} <= set(
            metrics[model]
        )
        assert metrics[model]["images"] == 8
        assert metrics[model]["cmmd"] > 0
    comparison = metrics["finetuned_vs_base"]
    for metric in ("aesthetic", "clip_score"):
        for stat in ("diff", "ci_low", "ci_high", "win_rate", "p_value"):
            assert np.isfinite(comparison[f"{metric}_{stat}"]), (metric, stat)
        assert comparison[f"{metric}_ci_low"] <= comparison[f"{metric}_diff"] <= comparison[f"{metric}_ci_high"]
    assert comparison["aesthetic_diff"] == pytest.approx(
        scores[scores.model == "finetuned"]["aesthetic_score"].mean()
        - scores[scores.model == "base"]["aesthetic_score"].mean(),
        abs=1e-6,
    )
    assert comparison["pairs"] == 8 and comparison["prompts"] == 4

    # the plots dvc.yaml declares: one image per grid, one histogram per score
    env = tool_env()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, check=True, env=env)
    Path(".dvc/plots").mkdir(exist_ok=True)
    shutil.copy(PROJECT / ".dvc/plots/score_histogram.json", ".dvc/plots/score_histogram.json")
    declared = [  # the sample and evaluate stages' plots (the others read other stages' outputs)
        plot
        for plot in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
        if all(key.startswith(("sample.", "evaluate.")) for key in re.findall(r"\$\{([^}]+)\}", str(plot)))
    ]
    Path("dvc.yaml").write_text(yaml.safe_dump({"plots": declared}))
    shown = subprocess.run(["dvc", "plots", "show", "--json"], check=True, env=env, capture_output=True, text=True)
    plots = json.loads(shown.stdout)["data"]
    grids = sorted(name for name, entries in plots.items() if entries[0]["type"] == "image")
    assert grids == [f"data/samples/grids/{p}.png" for p in sorted(sample_params["prompt_ids"])]
    for name in ("aesthetic_histogram", "clip_score_histogram"):
        spec = plots[name][0]["content"]
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        assert {d["model"] for d in spec["data"]["values"]} == {"finetuned", "base"}
        assert spec["spec"]["encoding"]["x"]["bin"]
