"""The caption stage: metadata templates, BLIP on a tiny random model saved and loaded
through ``from_pretrained``, WD14 on a tiny ONNX model with known outputs, combination
rules, token counts, exports, resumability and failures that keep finished work."""

from __future__ import annotations

import copy
import io
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from pipeline_repo import PipelineRepo
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from postertune.caption.blip import BlipCaptioner
from postertune.caption.cache import CaptionCache, CaptionRecord
from postertune.caption.combine import combine_row
from postertune.caption.export import KOHYA_FILE
from postertune.caption.metadata import as_list, render_template
from postertune.caption.params import CaptionParams, CombineParams
from postertune.caption.run import CACHE_DIR, CAPTIONS, EXPORT_DIR, cache_settings, caption, caption_images
from postertune.caption.tokens import CLIP_CONTEXT, token_counts
from postertune.caption.wd14 import Wd14Tagger, wd14_input
from postertune.errors import PipelineError
from postertune.models.tokenizer import clip_tokenizer
from postertune.params import ParamError, build
from postertune.store import ShardStore, ShardWriter, sha256_hex

# --- tiny WD14 tagger: channel means (B, G, R in 0..1) -> fixed linear map -> sigmoid ---

WD14_SIZE = 8
WD14_TAGS = [  # name, category, weights on the (B, G, R) means, bias
    ("general", 9, (0, 0, 0), 3.0),
    ("sensitive", 9, (0, 0, 0), -3.0),
    ("red_theme", 0, (0, 0, 10), -5.0),
    ("blue_theme", 0, (10, 0, 0), -7.0),
    ("white_background", 0, (0, 10, 0), -2.5),
    ("long_hair", 0, (0, 0, 0), 2.0),
    ("^_^", 0, (0, 0, 0), 2.0),
    ("watermark", 0, (0, 0, 0), 3.0),
    ("maybe_tag", 0, (0, 0, 0), 0.0),
    ("hero_(character)", 4, (0, 0, 0), 0.847),  # p = 0.70
    ("poster", 0, (0, 0, 0), 1.0),
]


def wd14_expected(bgr_means: tuple[float, float, float]) -> np.ndarray:
    logits = [np.dot(w, bgr_means) + b for _, _, w, b in WD14_TAGS]
    return 1 / (1 + np.exp(-np.array(logits)))


@pytest.fixture(scope="module")
def wd14_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("wd14")
    weights = np.array([w for _, _, w, _ in WD14_TAGS], dtype=np.float32).T / 255.0
    bias = np.array([b for *_, b in WD14_TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0"], ["means"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["means", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], ["shifted"]),
            helper.make_node("Sigmoid", ["shifted"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", WD14_SIZE, WD14_SIZE, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(WD14_TAGS)])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    tags = pd.DataFrame(
        {
            "tag_id": range(len(WD14_TAGS)),
            "name": [t[0] for t in WD14_TAGS],
            "category": [t[1] for t in WD14_TAGS],
            "count": 100,
        }
    )
    tags.to_csv(folder / "selected_tags.csv", index=False)
    return folder / "model.onnx", folder / "selected_tags.csv"


# --- tiny BLIP: random weights, saved and loaded like a real checkpoint ---

BLIP_WORDS = "a an the of poster picture man woman city night red blue with and in on movie film dark sky".split()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *BLIP_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = BlipTextConfig(
        vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=37, projection_dim=32,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
        bos_token_id=vocab.index("[DEC]"), eos_token_id=3, sep_token_id=3, pad_token_id=0,
    )  # fmt: skip
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32, image_text_hidden_size=32
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- a kept-image table and its shard store, in the pipeline's default layout ---


def poster(color: tuple[int, int, int], size=(24, 36), fmt="PNG", noise=0) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.int16) + np.array(color, dtype=np.int16)
    if noise:
        pixels += np.random.default_rng(0).integers(-noise, noise + 1, pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format=fmt)
    return out.getvalue()


@dataclass(frozen=True)
class Layout:
    """The caption stage's inputs and outputs under a test folder, where its params put them."""

    root: Path

    images = property(lambda self: self.root / "data/filtered/images.parquet")
    store = property(lambda self: self.root / "data/raw/shards")
    folder = property(lambda self: self.root / "data/captions")
    output = property(lambda self: self.folder / CAPTIONS)
    cache = property(lambda self: self.folder / CACHE_DIR)
    export = property(lambda self: self.folder / EXPORT_DIR)


@dataclass
class Dataset:
    root: Path
    paths: Layout
    sha: dict[str, str]  # row name -> sha256
    data: dict[str, bytes]


def run_caption(params: CaptionParams, paths: Layout):
    return caption(replace(params, images=paths.images, shards=paths.store, output=paths.folder))


def make_dataset(root: Path) -> Dataset:
    data = {
        "red": poster((255, 0, 0), size=(36, 36)),
        "blue": poster((0, 0, 255), fmt="JPEG"),
        "green": poster((0, 255, 0), size=(30, 30)),
        "corrupt": poster((200, 120, 40), size=(64, 96), fmt="JPEG", noise=60)[:900],
        "missing": poster((9, 9, 9)),
    }
    metadata = {
        "red": ("Heat", "['Drama', 'Crime']", "A thief."),
        "blue": ("Blue Sky", "Drama, Romance", None),
        "green": (None, "", "nan"),
        "corrupt": ("Broken", "Horror", "Bits."),
        "missing": ("Lost", "Mystery", None),
    }
    paths = Layout(root)
    sha = {name: sha256_hex(blob) for name, blob in data.items()}
    with ShardWriter(paths.store) as writer:
        for name, blob in data.items():
            if name != "missing":
                writer.add(sha[name], blob)
    rows = []
    for i, (name, (title, genres, overview)) in enumerate(metadata.items()):
        image = Image.open(io.BytesIO(data[name]))
        rows.append(
            dict(sha256=sha[name], source="demo", url=f"file:{name}", row=i, title=title, genres=genres,
                 overview=overview, width=image.width, height=image.height, format=image.format)
        )  # fmt: skip
    paths.images.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(paths.images, index=False)
    return Dataset(root, paths, sha, data)


@pytest.fixture
def dataset(tmp_path) -> Dataset:
    return make_dataset(tmp_path)


def full_params(blip_dir: Path, wd14_files: tuple[Path, Path], **overrides) -> CaptionParams:
    values = {
        "captioners": ["wd14", "blip", "metadata"],
        "chunk_size": 2,
        "blip": {"model": str(blip_dir), "batch_size": 2, "prefix": "a poster of", "num_beams": 2,
                 "min_length": 6, "max_length": 12},
        "wd14": {"model": str(wd14_files[0]), "tags_csv": str(wd14_files[1]), "undesired_tags": ["watermark"],
                 "always_first_tags": ["poster"]},
        "combine": {"prepend_tags": ["movie poster"], "tag_columns": ["genres"]},
        "export": {"kohya_json": True, "sidecars": "caption", "images": True},
    }  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return build(CaptionParams, copy.deepcopy(values), "caption")


def captions_by_name(dataset: Dataset) -> dict[str, dict]:
    frame = pd.read_parquet(dataset.paths.output)
    by_sha = {row["sha256"]: row for row in frame.to_dict("records")}
    return {name: by_sha[sha] for name, sha in dataset.sha.items() if sha in by_sha}


# --- metadata captions ---

TEMPLATE = "{title}, {genres} poster. {overview}"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"title": "Heat", "genres": "['Drama', 'Crime']", "overview": "A  thief\nat night."},
         "Heat, Drama, Crime poster. A thief at night."),
        ({"title": None, "genres": "Drama, Crime", "overview": float("nan")}, "Drama, Crime poster."),
        ({"title": "Heat", "genres": "[]", "overview": "nan"}, "Heat poster."),
        ({"title": "Heat", "genres": "[{'id': 18, 'name': 'Drama'}]", "overview": "None"}, "Heat, Drama poster."),
        ({"title": pd.NA, "genres": None, "overview": "Only this."}, "poster. Only this."),
        ({"title": "", "genres": "  ", "overview": None}, ""),
        ({}, ""),
    ],
)  # fmt: skip
def test_metadata_template_drops_missing_fields_cleanly(row, expected):
    assert render_template(TEMPLATE, row) == expected


def test_template_keeps_no_empty_brackets_and_genres_parse_every_way():
    assert render_template("{title} ({year})", {"title": "Heat", "year": None}) == "Heat"
    assert as_list("['Drama', 'Crime']") == as_list("Drama, Crime") == as_list(["Drama", "Crime"]) == ["Drama", "Crime"]
    assert as_list('[{"id": 18, "name": "Drama"}]') == ["Drama"]
    assert as_list(None) == as_list("nan") == as_list(float("nan")) == []


# --- token counting ---


def test_token_counts_match_the_clip_tokenizer_and_flag_truncation():
    texts = ["a poster", "Heat, Drama, Crime poster. A thief.", "night " * 80]
    counts = token_counts(texts)
    assert counts == [len(clip_tokenizer()(t).input_ids) for t in texts]
    assert counts[0] == 4  # <|startoftext|> a poster <|endoftext|>
    assert counts[2] == 82 > CLIP_CONTEXT


# --- WD14 ---


def test_wd14_input_is_white_padded_square_bgr():
    array = wd14_input(Image.new("RGB", (4, 8), (255, 0, 0)), 8)
    assert array.shape == (8, 8, 3) and array.dtype == np.float32
    assert array[4, 4].tolist() == [0, 0, 255]  # red, as B, G, R
    assert array[4, 0].tolist() == [255, 255, 255]  # white padding at the side


def test_wd14_tagger_probabilities_thresholds_order_and_names(wd14_files):
    params = full_params(Path("unused"), wd14_files).wd14
    tagger = Wd14Tagger(params)
    assert tagger.image_size == WD14_SIZE
    red, tall_red = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 16), (255, 0, 0))
    probs = tagger.probabilities([red, tall_red])
    np.testing.assert_allclose(probs[0], wd14_expected((0, 0, 1)), atol=1e-5)
    np.testing.assert_allclose(probs[1], wd14_expected((0.5, 0.5, 1)), atol=0.02)  # half white after padding

    square, tall = [r.tags for r in tagger.caption(["a", "b"], [red, tall_red])]
    # always-first tag ahead; then by probability; watermark undesired; kaomoji keeps its underscore
    assert list(square) == ["poster", "red theme", "long hair", "^_^", "maybe tag"]
    assert "white background" in tall and "white background" not in square

    stricter = Wd14Tagger(build(type(params), {**params.settings(), "general_threshold": 0.6,
                                               "character_threshold": 0.6, "rating": True,
                                               "replace_underscores": False, "undesired_tags": ["long hair"],
                                               "always_first_tags": []}, "caption.wd14"))  # fmt: skip
    assert list(stricter.caption(["a"], [red])[0].tags) == [
        "general", "hero_(character)", "red_theme", "watermark", "^_^", "poster",
    ]  # fmt: skip


# --- BLIP ---


def test_blip_captions_a_batch_through_from_pretrained(blip_dir):
    params = full_params(blip_dir, (Path("m"), Path("t"))).blip
    captioner = BlipCaptioner(params)
    assert captioner.image_size == 32 and captioner.device == "cpu"
    images = [Image.new("RGB", (20, 30), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    records = captioner.caption(["r", "b", "g"], images)
    texts = [r.text for r in records]
    assert all(t.startswith("a poster of ") and len(t.split()) > 3 for t in texts), texts
    assert all(set(t.split()) <= set(BLIP_WORDS) for t in texts)

    nucleus = build(type(params), {**params.settings(), "decoding": "nucleus", "top_p": 0.9, "seed": 3,
                                   "prefix": "", "num_beams": 1}, "caption.blip")  # fmt: skip
    sampler = BlipCaptioner(nucleus)
    first, again = sampler.caption(["r"], images[:1]), sampler.caption(["r"], images[:1])
    assert first == again and first[0].text


# --- combination rules ---


def test_combine_prefers_tags_then_falls_back_and_keeps_both_lengths():
    params = CombineParams(prepend_tags=["movie poster"], tag_columns=["genres"])
    row = {"sha256": "s", "genres": "Drama, Crime"}
    meta = CaptionRecord("s", text="Heat, Drama", long_text="Heat, a Drama poster.")
    blip = CaptionRecord("s", text="a poster of a man")
    tagged = combine_row(
        row, {"wd14": CaptionRecord("s", tags=("poster", "man")), "blip": blip, "metadata": meta}, params
    )
    assert tagged["tags"] == ["movie poster", "poster", "man", "Drama", "Crime"]
    assert (tagged["caption"], tagged["caption_source"]) == ("movie poster, poster, man, Drama, Crime", "wd14")
    assert (tagged["caption_long"], tagged["caption_long_source"]) == ("a poster of a man", "blip")

    untagged = combine_row(row, {"wd14": CaptionRecord("s", tags=()), "blip": blip, "metadata": meta}, params)
    assert (untagged["caption"], untagged["caption_source"]) == ("movie poster, Heat, Drama", "metadata")
    only_meta = combine_row(row, {"metadata": meta}, params)
    assert (only_meta["caption_long"], only_meta["caption_long_source"]) == ("Heat, a Drama poster.", "metadata")

    assert combine_row(row, {"metadata": CaptionRecord("s", skip="empty_metadata")}, params) is None
    bad = CaptionRecord("s", skip="truncated", bad_image=True)
    assert combine_row(row, {"wd14": bad, "metadata": meta}, params) is None


# --- the whole run ---


def test_run_writes_captions_exports_and_metrics(dataset, blip_dir, wd14_files):
    report = run_caption(full_params(blip_dir, wd14_files), dataset.paths)
    rows = captions_by_name(dataset)
    assert set(rows) == {"red", "blue", "green"}  # corrupt and missing images are left out

    red = rows["red"]
    assert list(red["tags"]) == [
        "movie poster",
        "poster",
        "red theme",
        "long hair",
        "^_^",
        "maybe tag",
        "Drama",
        "Crime",
    ]
    assert red["caption"] == ", ".join(red["tags"]) and red["caption_source"] == "wd14"
    assert red["caption_long"].startswith("a poster of ") and red["caption_long_source"] == "blip"
    assert (red["width"], red["height"], red["title"], red["source"]) == (36, 36, "Heat", "demo")
    assert "blue theme" in rows["blue"]["tags"] and "Romance" in rows["blue"]["tags"]
    assert "Drama" not in rows["green"]["tags"]  # empty metadata row, still captioned by the models

    m = report.metrics
    assert (m["images"], m["captioned"], m["dropped"], m["coverage"]) == (5, 3, 2, 0.6)
    assert m["skipped"] == {"empty_metadata": 1, "missing_image": 1, "truncated": 1}
    assert m["captioner"] == {"wd14": 3, "blip": 3, "metadata": 4}
    short_tokens = token_counts([r["caption"] for r in rows.values()])
    assert m["tokens"]["caption_max"] == max(short_tokens)
    assert m["multi_chunk"] == {"caption": 0, "caption_long": 0}
    assert report.computed == {"wd14": 5, "blip": 5}
    current = json.loads((dataset.paths.cache / "current.json").read_text())
    assert set(current) == {"wd14", "blip"} and all((dataset.paths.cache / f).is_dir() for f in current.values())

    export = dataset.paths.export
    kohya = json.loads((export / KOHYA_FILE).read_text())
    assert kohya == {r["sha256"]: {"caption": r["caption_long"], "tags": ", ".join(r["tags"])} for r in rows.values()}
    assert (export / f"{dataset.sha['red']}.txt").read_text() == red["caption"] + "\n"
    assert (export / f"{dataset.sha['blue']}.jpg").read_bytes() == dataset.data["blue"]
    assert len(list(export.iterdir())) == 1 + 3 + 3


def test_metadata_only_run_needs_no_images_and_reports_long_captions(dataset):
    frame = pd.read_parquet(dataset.paths.images)
    frame.loc[0, "overview"] = "a very long story " * 20
    frame.to_parquet(dataset.paths.images, index=False)
    shutil.rmtree(dataset.paths.store)  # the metadata captioner reads no image
    params = build(
        CaptionParams,
        {"combine": {"prepend_tags": ["movie poster"]}, "export": {"kohya_json": False, "sidecars": "none"}},
        "c",
    )

    report = run_caption(params, dataset.paths)
    out = pd.read_parquet(dataset.paths.output).set_index("title")
    assert out.loc["Heat", "caption"] == "movie poster, Heat, Drama, Crime"
    assert out.loc["Heat", "caption_long"].startswith("Heat, Drama, Crime poster. a very long story")
    assert out.loc["Blue Sky", "caption_long"] == "Blue Sky, Drama, Romance poster."
    assert set(out["caption_source"]) == {"metadata"} and len(out) == 4
    assert report.metrics["multi_chunk"] == {"caption": 0, "caption_long": 1}
    assert report.metrics["skipped"] == {"empty_metadata": 1} and report.computed == {}
    assert list(dataset.paths.export.iterdir()) == []


def test_rerun_captions_nothing_new_and_a_changed_setting_recaptions(dataset, blip_dir, wd14_files):
    params = full_params(blip_dir, wd14_files)
    run_caption(params, dataset.paths)
    first = pd.read_parquet(dataset.paths.output)

    again = run_caption(params, dataset.paths)
    assert again.computed == {"wd14": 0, "blip": 0}
    pd.testing.assert_frame_equal(pd.read_parquet(dataset.paths.output), first)

    reprefixed = run_caption(full_params(blip_dir, wd14_files, blip={"prefix": "a picture of"}), dataset.paths)
    assert reprefixed.computed == {"wd14": 0, "blip": 5}
    rows = captions_by_name(dataset)
    assert all(r["caption_long"].startswith("a picture of ") for r in rows.values())

    stricter = run_caption(full_params(blip_dir, wd14_files, wd14={"general_threshold": 0.6}), dataset.paths)
    assert stricter.computed == {"wd14": 5, "blip": 0}  # back to the first prefix: its cache is still there
    assert "maybe tag" not in captions_by_name(dataset)["red"]["tags"]


def test_killed_run_keeps_finished_chunks(dataset, blip_dir, wd14_files):
    params = full_params(blip_dir, wd14_files)

    class DiesOnSecondBatch(Wd14Tagger):
        calls = 0

        def caption(self, shas, images):
            DiesOnSecondBatch.calls += 1
            if DiesOnSecondBatch.calls == 2:
                raise KeyboardInterrupt
            return super().caption(shas, images)

    cache = CaptionCache(dataset.paths.cache, "wd14", cache_settings("wd14", params))
    shas = list(dataset.sha.values())
    with pytest.raises(KeyboardInterrupt):
        caption_images(lambda: DiesOnSecondBatch(params.wd14), cache, shas, ShardStore(dataset.paths.store), params)
    resumed = CaptionCache(dataset.paths.cache, "wd14", cache_settings("wd14", params))
    assert set(resumed.records) == {dataset.sha["red"], dataset.sha["blue"]}  # the first chunk of two

    report = run_caption(params, dataset.paths)
    assert report.computed["wd14"] == 3
    assert "red theme" in captions_by_name(dataset)["red"]["tags"]
    assert len(list(resumed.folder.glob("part-*.parquet"))) == 1  # compacted after finishing


def test_missing_model_fails_in_one_line_and_keeps_earlier_work(dataset, blip_dir, wd14_files, tmp_path):
    run_caption(full_params(blip_dir, wd14_files, captioners=["wd14", "metadata"]), dataset.paths)
    output = dataset.paths.output.read_bytes()
    cached = sorted(p.name for p in dataset.paths.cache.iterdir())

    missing_blip = full_params(blip_dir, wd14_files, blip={"model": str(tmp_path / "no-such-blip"), "prefix": "x"})
    with pytest.raises(ParamError) as caught:
        run_caption(missing_blip, dataset.paths)
    assert "caption.blip.model" in str(caught.value) and "\n" not in str(caught.value)

    missing_wd14 = full_params(blip_dir, wd14_files, wd14={"model": str(tmp_path / "nope.onnx"), "rating": True})
    with pytest.raises(ParamError, match=r"caption\.wd14\.model: .*nope\.onnx not found"):
        run_caption(missing_wd14, dataset.paths)

    assert dataset.paths.output.read_bytes() == output
    assert sorted(p.name for p in dataset.paths.cache.iterdir()) == cached


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"captioners": []}, "caption.captioners"),
        ({"captioners": ["metadata", "metadata"]}, "caption.captioners"),
        ({"captioners": ["clip"]}, "caption.captioners[0]"),
        ({"wd14": {"general_threshold": 1.5}}, "caption.wd14.general_threshold"),
        ({"blip": {"min_length": 50, "max_length": 20}}, "caption.blip.min_length"),
        ({"metadata": {"template": "{title"}}, "caption.metadata.template"),
        ({"metadata": {"long_template": "no fields"}}, "caption.metadata.long_template"),
        ({"export": {"sidecars": "yes"}}, "caption.export.sidecars"),
    ],
)
def test_bad_params_name_the_parameter(values, key):
    with pytest.raises(ParamError) as caught:
        build(CaptionParams, values, "caption")
    assert caught.value.name == key


def test_unknown_column_in_params_is_named_before_any_model_loads(dataset):
    params = build(CaptionParams, {"metadata": {"template": "{title} {year}"}}, "caption")
    with pytest.raises(ParamError, match=r"caption\.metadata\.template: field \{year\} is not a column"):
        run_caption(params, dataset.paths)
    duplicated = pd.concat([pd.read_parquet(dataset.paths.images)] * 2)
    duplicated.to_parquet(dataset.paths.images, index=False)
    with pytest.raises(PipelineError, match=r"images\.parquet: row 5: sha256 .* appears twice"):
        run_caption(build(CaptionParams, {}, "caption"), dataset.paths)


# --- the stage as a process, and under DVC ---


@pytest.mark.slow
def test_dvc_repro_keeps_the_cache_and_reports_a_missing_model_in_one_line(tmp_path, wd14_files):
    repo = PipelineRepo.copy_of_project(tmp_path / "repo")
    make_dataset(tmp_path / "inputs")
    for rel in ("data/filtered/images.parquet", "data/raw/shards"):
        target = repo.root / rel
        shutil.rmtree(target, ignore_errors=True)
        target.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp_path / "inputs" / rel, target)
    (repo.root / "models/wd14").mkdir(parents=True)
    for source in wd14_files:
        shutil.copy(source, repo.root / "models/wd14" / source.name)

    def set_caption_params(**values) -> None:
        params = yaml.safe_load((repo.root / "params.yaml").read_text())
        params["caption"].update(values)
        (repo.root / "params.yaml").write_text(yaml.safe_dump(params))

    set_caption_params(captioners=["wd14", "metadata"])
    repo.dvc("repro", "--single-item", "caption")
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]["caption"]
    assert {o["path"] for o in lock["outs"]} == {
        "data/captions/captions.parquet", "data/captions/cache", "data/captions/export", "metrics/caption.json",
    }  # fmt: skip
    assert json.loads((repo.root / "metrics/caption.json").read_text())["captioned"] == 3
    assert "didn't change" in repo.dvc("repro", "--single-item", "caption").stdout
    cache = repo.root / "data/captions/cache"
    cached = sorted(cache.iterdir())

    (repo.root / "models/wd14/model.onnx").unlink()
    set_caption_params(captioners=["wd14", "metadata"], wd14={"general_threshold": 0.5})
    failed = repo.dvc("repro", "--single-item", "caption", check=False)
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("caption: error:")]
    assert errors == ["caption: error: param caption.wd14.model: models/wd14/model.onnx not found"]
    assert sorted(cache.iterdir()) == cached  # persisted: a failed run keeps every cached caption


def test_captions_and_token_counts_do_not_depend_on_how_many_rows_are_converted_at_once(monkeypatch):
    """The caption table is built a chunk of rows at a time (a million rows never become a
    million dicts): chunk boundaries must change neither a value nor a column's dtype."""
    import postertune.caption.tokens as tokens
    import postertune.tables as tables
    from postertune.caption.combine import combine_captions
    from postertune.caption.run import caption_metadata

    rows = 7
    table = pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(rows)],
            "title": ["Heat", None, "Alien", "nan", "Up", "Jaws", "Ran"],
            "genres": ["['Crime', 'Drama']", "Horror", None, "[]", "Comedy, Family", "Thriller", "Drama"],
            "overview": ["A heist.", None, "In space.", "x", None, "A shark.", "A king."],
            "width": pd.array([600, None, 500, 400, 300, 200, 100], dtype="Int64"),
            "dpi": [72.0, np.nan, 96.0, np.nan, 300.0, 72.0, 72.0],
            "reason": [None] * rows,
        }
    )
    params = build(CaptionParams, {}, "caption")

    def build_captions() -> tuple[pd.DataFrame, list[int]]:
        results = {"metadata": caption_metadata(table, params.metadata)}
        captions = combine_captions(table, results, params.combine)
        return captions, token_counts(captions["caption_long"].tolist())

    whole, whole_counts = build_captions()
    monkeypatch.setattr(tables, "ROWS_PER_CHUNK", 2)
    monkeypatch.setattr(tokens, "TEXTS_PER_CALL", 2)
    chunked, chunked_counts = build_captions()
    pd.testing.assert_frame_equal(chunked, whole)
    assert chunked_counts == whole_counts
    assert len(whole) == rows and whole["caption_long"].notna().all()
