"""Caption, curate, sample and evaluate launched as two CPU processes (``accelerate launch``,
gloo) write byte for byte what one process writes, and a launch killed part-way through
resumes from the parts it finished without redoing them. For caption, sample and evaluate
one two-process launch shows both: it is killed once both processes have written parts, and
the two-process rerun that finishes the rest (and merges every part) must write what one
process writes.

One process is the reference: the stage run here, on one thread, as ``dvc repro`` runs it
without ``POSTERTUNE_ACCELERATE_CONFIG``. Tiny models, a few dozen images each.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from postertune.caption.params import CaptionParams
from postertune.caption.run import run as caption_run
from postertune.cli import run_stage
from postertune.curate.params import CurateParams
from postertune.curate.run import run as curate_run
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.run import run as evaluate_run
from postertune.launch import block
from postertune.sample.params import SampleParams
from postertune.sample.run import run as sample_run
from postertune.store import ShardWriter, sha256_hex
from tests.launching import launch, launch_and_kill
from tests.posters import poster
from tests.test_caption import blip_dir, make_dataset, wd14_files  # noqa: F401 (fixtures)
from tests.test_caption import poster as flat_poster
from tests.test_curate import encoded, write_inputs
from tests.test_evaluate import reference_posters, sample_rows
from tests.test_sample import PRESETS, PROMPTS, models  # noqa: F401 (fixture)

slow = pytest.mark.slow
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shares_are_contiguous_blocks_that_cover_the_items_once():
    items = list(range(11))
    for count in (1, 2, 3, 4, 11, 12):
        blocks = [block(items, index, count) for index in range(count)]
        assert sum(blocks, []) == items
        sizes = [len(b) for b in blocks]
        assert max(sizes) - min(sizes) <= 1


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def outputs(folder: Path, *names: str) -> dict[str, bytes]:
    """Every file of the named outputs (files or folders) of a stage run in ``folder``."""
    found = {}
    for name in names:
        path = folder / name
        found.update({f"{name}/{k}": v for k, v in files(path).items()} if path.is_dir() else {name: path.read_bytes()})
    return found


def metrics(folder: Path, stage: str) -> dict:
    return json.loads((folder / f"metrics/{stage}.json").read_text())


def write_params(folder: Path, stage: str, section: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({stage: section}))


def run_here(folder: Path, monkeypatch, stage: str, params_type: type, run) -> None:
    """The stage as one process runs it, in ``folder``."""
    with monkeypatch.context() as patch:
        patch.chdir(folder)
        run_stage(stage, params_type, run)


# --- caption ---------------------------------------------------------------------------


def caption_inputs(root: Path, extra: int) -> None:
    """The caption tests' kept-image table (a corrupt and a missing image among them) and
    ``extra`` more posters."""
    dataset = make_dataset(root)
    table = pd.read_parquet(dataset.paths.images)
    rows = []
    with ShardWriter(dataset.paths.store) as writer:
        for i in range(extra):
            data = flat_poster((40 * i % 256, 255 - 7 * i % 256, 90), size=(24 + i % 5, 36))
            writer.add(sha256_hex(data), data)
            rows.append({**table.iloc[0].to_dict(), "sha256": sha256_hex(data), "row": 5 + i, "title": f"Poster {i}"})
    pd.concat([table, pd.DataFrame(rows)], ignore_index=True).to_parquet(dataset.paths.images, index=False)


def caption_section(blip: Path, wd14: tuple[Path, Path]) -> dict:
    return {
        "captioners": ["wd14", "blip", "metadata"],
        "chunk_size": 2,
        "workers": 1,
        "blip": {"model": str(blip), "device": "cpu", "batch_size": 2, "num_beams": 2, "min_length": 6,
                 "max_length": 12},
        "wd14": {"model": str(wd14[0]), "tags_csv": str(wd14[1]), "device": "cpu"},
        "export": {"kohya_json": True, "sidecars": "caption", "images": True},
    }  # fmt: skip


CAPTION_OUTPUTS = ("data/captions/captions.parquet", "data/captions/export", "metrics/caption.json")


def part_shas(parts: list[Path]) -> set[str]:
    return {sha for part in parts for sha in pq.read_table(part, columns=["sha256"]).column("sha256").to_pylist()}


@slow
def test_caption_in_two_processes_writes_what_one_writes_and_a_killed_launch_resumes(
    tmp_path,
    monkeypatch,
    blip_dir,  # noqa: F811 (the fixture)
    wd14_files,  # noqa: F811
):
    one, killed = tmp_path / "one", tmp_path / "killed"
    for folder in (one, killed):
        caption_inputs(folder, extra=40)
        write_params(folder, "caption", caption_section(blip_dir, wd14_files))

    run_here(one, monkeypatch, "caption", CaptionParams, caption_run)
    cache = killed / "data/captions/cache"

    def both_wrote() -> bool:
        return any(cache.glob("*/part-*-r0.parquet")) and any(cache.glob("*/part-*-r1.parquet"))

    launch_and_kill("caption", killed, both_wrote)
    assert not (killed / "data/captions/captions.parquet").exists()
    for folder in cache.iterdir():  # each process captioned images of its own
        assert not part_shas(list(folder.glob("part-*-r0.parquet"))) & part_shas(list(folder.glob("part-*-r1.parquet")))
    finished = sum(len(part_shas(list(folder.glob("part-*")))) for folder in cache.iterdir())
    assert 0 < finished < 2 * 45

    rerun = launch("caption", killed)
    ran = re.search(r"model runs this time: wd14 (\d+), blip (\d+)", rerun.stdout)
    assert int(ran[1]) + int(ran[2]) == 2 * 45 - finished
    assert outputs(killed, *CAPTION_OUTPUTS) == outputs(one, *CAPTION_OUTPUTS)
    # the main process folded every process's parts into one per captioner
    assert len(list(cache.glob("*/part-*"))) == 2


# --- curate ----------------------------------------------------------------------------


def curate_section() -> dict:
    return dict(
        captions="in/captions.parquet",
        shards="in/shards",
        output="curated",
        device="cpu",
        workers=1,
        chunk_size=3,
        batch_size=2,
        top_k=8,
        clusters=2,
        sheet_size=4,
    )


@slow
def test_curate_in_two_processes_writes_what_one_writes(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    payloads = [encoded(poster(i), "JPEG", quality=60 + 2 * i) for i in range(14)] + [b"not an image"]
    for folder in (one, two):
        write_inputs(folder / "in", payloads, extra_rows=1)
        write_params(folder, "curate", curate_section())

    run_here(one, monkeypatch, "curate", CurateParams, curate_run)
    launch("curate", two)
    names = ("curated/images.parquet", "curated/dropped.parquet", "curated/plots")
    assert outputs(two, *names) == outputs(one, *names)
    single, double = metrics(one, "curate"), metrics(two, "curate")
    assert single["run"].pop("seconds") >= 0 and double["run"].pop("seconds") >= 0
    assert double == single
    assert double["run"]["images_embedded"] == 14
    # the main process folded every process's parts into one of each kind
    assert [p.name.split("-")[0] for p in sorted((two / "curated/cache").glob("*/*.parquet"))] == ["images", "texts"]


# --- sample ----------------------------------------------------------------------------


def sample_section(weights: dict[str, Path]) -> dict:
    return dict(
        models=[
            dict(name="finetuned", base=str(weights["base"]), unet=str(weights["unet"])),
            dict(name="base", base=str(weights["base"])),
        ],
        prompts=str(PROMPTS),
        negative_presets=str(PRESETS),
        prompt_ids=["pet_bag", "mecha_anime"],
        images_per_prompt=2,
        steps=2,
        width=64,
        height=64,
        grid_cell_width=64,
        device="cpu",
    )


@slow
def test_sample_in_two_processes_renders_what_one_renders_and_a_killed_launch_resumes(
    tmp_path,
    monkeypatch,
    models,  # noqa: F811 (the fixture)
):
    one, killed = tmp_path / "one", tmp_path / "killed"
    for folder in (one, killed):
        write_params(folder, "sample", sample_section(models))

    run_here(one, monkeypatch, "sample", SampleParams, sample_run)
    assert len(files(one / "data/samples/images")) == 8

    parts = killed / "data/samples/parts"
    launch_and_kill("sample", killed, lambda: any(parts.rglob("*.csv")))
    assert not (killed / "data/samples/manifest.csv").exists()
    finished = len(list(parts.rglob("*.csv")))
    rerun = launch("sample", killed)
    assert (metrics(killed, "sample")["reused"], metrics(killed, "sample")["rendered"]) == (finished, 8 - finished)
    assert files(killed / "data/samples") == files(one / "data/samples")
    assert f"{8 - finished} rendered, {finished} reused" in rerun.stdout


# --- evaluate --------------------------------------------------------------------------


def evaluate_inputs(folder: Path) -> None:
    """The sample stage's manifest and images (larger than the tiny CLIP needs, so that a
    batch takes a while), and real posters for CMMD."""
    rows = sample_rows(seeds=range(6))
    for row in rows:
        path = folder / "data/samples" / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        poster(row.pop("image_seed"), size=(512, 768)).save(path)
    pd.DataFrame(rows).to_csv(folder / "data/samples/manifest.csv", index=False)
    reference_posters(folder / "real", 12)


def evaluate_section() -> dict:
    return dict(
        clip_model="tiny",
        clip_weights=None,
        bootstrap_resamples=1000,
        batch_size=1,
        device="cpu",
        cmmd={"images": "real/images.parquet", "shards": "real/shards"},
    )


EVALUATE_OUTPUTS = ("data/eval", "metrics/evaluate.json")


@slow
def test_evaluate_in_two_processes_scores_what_one_scores_and_a_killed_launch_resumes(tmp_path, monkeypatch):
    one, killed = tmp_path / "one", tmp_path / "killed"
    for folder in (one, killed):
        evaluate_inputs(folder)
        write_params(folder, "evaluate", evaluate_section())

    run_here(one, monkeypatch, "evaluate", EvaluateParams, evaluate_run)
    parts = killed / "data/eval/parts"
    launch_and_kill("evaluate", killed, lambda: any(parts.glob("*.npy")))
    assert not (killed / "data/eval/scores.csv").exists()
    finished = len(list(parts.glob("*.npy")))  # one image per batch, one batch per part
    rerun = launch("evaluate", killed)
    assert f"evaluate: {finished} image embeddings reused from the parts of a killed launch" in rerun.stdout
    assert outputs(killed, *EVALUATE_OUTPUTS) == outputs(one, *EVALUATE_OUTPUTS)
    assert sorted(files(killed / "data/eval")) == ["comparisons.csv", "scores.csv", "summary.csv"]  # no parts left
