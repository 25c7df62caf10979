"""The train stage under DVC with the demo params: ``dvc repro`` trains the tiny model on CPU,
``dvc plots show`` has its loss curve, and a longer run resumes from the persisted checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.pipeline_repo import PipelineRepo, tool_env
from tests.train_inputs import write_dataset

pytestmark = pytest.mark.slow

DEMO_POSTERS = [(600, 900)] * 8 + [(700, 1000), (800, 800), (640, 960), (512, 768)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> PipelineRepo:
    repo = PipelineRepo.copy_of_project(tmp_path_factory.mktemp("train-dvc"))
    repo.env = tool_env(OMP_NUM_THREADS="1")
    # the train stage's inputs, as the curate stage and the fetch stage leave them
    write_dataset(repo.root, DEMO_POSTERS)
    (repo.root / "data/curated").mkdir(parents=True, exist_ok=True)
    (repo.root / "captions.parquet").rename(repo.root / "data/curated/images.parquet")
    (repo.root / "data/raw").mkdir(parents=True, exist_ok=True)
    (repo.root / "shards").rename(repo.root / "data/raw/shards")
    return repo


def test_demo_trains_in_dvc_repro_and_its_loss_curve_shows(repo):
    ran = repo.dvc("repro", "--single-item", "train")
    assert "Running stage 'train'" in ran.stdout

    metrics = json.loads((repo.root / "metrics/train.json").read_text())
    params = yaml.safe_load((repo.root / "params.yaml").read_text())["train"]
    assert metrics["steps"] == params["max_train_steps"]
    assert metrics["images_seen"] == params["max_train_steps"] * params["batch_size"]
    assert (repo.root / "models/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (repo.root / "models/base/model_index.json").is_file()
    assert (repo.root / "models/sdxl-poster.safetensors").is_file()
    again = repo.dvc("repro", "--single-item", "train")
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout


def test_plots_show_the_loss_curve(repo):
    shown = repo.dvc("plots", "show", "--json").stdout
    assert "dvclive/train/plots/metrics/train/loss.tsv" in shown
    assert "dvclive/train/plots/metrics/val/loss.tsv" in shown
    assert "dvclive/train/plots/images/prompt-0" in shown
    rows = (repo.root / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + 50


def test_longer_run_resumes_from_the_persisted_checkpoint(repo):
    params_file = repo.root / "params.yaml"
    params_file.write_text(params_file.read_text().replace("max_train_steps: 50", "max_train_steps: 54"))
    out = repo.dvc("repro", "--single-item", "train")
    assert "resuming from" in out.stderr + out.stdout
    rows = (repo.root / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + 54 and rows[-1].split("\t")[0] == "54"
    metrics = json.loads((repo.root / "metrics/train.json").read_text())
    assert metrics["steps"] == 54 and metrics["images_seen"] == 54 * 4
