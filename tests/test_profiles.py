"""params.yaml is the default Hydra composition of conf/, and every profile is a valid recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from postertune.caption.params import CaptionParams
from postertune.curate.params import CurateParams
from postertune.dedupe.params import DedupeParams
from postertune.evaluate.params import EvaluateParams
from postertune.fetch.params import FetchParams
from postertune.filter.params import FilterParams
from postertune.params import build
from postertune.sample.params import SampleParams
from postertune.train.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "fetch": FetchParams,
    "dedupe": DedupeParams,
    "filter": FilterParams,
    "caption": CaptionParams,
    "curate": CurateParams,
    "train": TrainParams,
    "sample": SampleParams,
    "evaluate": EvaluateParams,
}


def compose(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compose_params.py"), "--output", str(out), *overrides],
        check=True,
        capture_output=True,
    )
    return yaml.safe_load(out.read_text())


def test_committed_params_equal_the_default_composition(tmp_path):
    # as committed at HEAD: an experiment applied to the workspace rewrites params.yaml
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True, check=True)
    committed = yaml.safe_load(shown.stdout)
    assert compose(tmp_path) == committed
    assert committed["profile"] == "demo"


def test_hydra_is_enabled_for_dvc_experiments():
    config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in config and "enabled = true" in config.lower()


@pytest.mark.parametrize("profile", ["demo", "sdxl"])
def test_every_stage_section_of_each_profile_is_valid(tmp_path, profile):
    params = compose(tmp_path, f"profile={profile}")
    assert params["profile"] == profile
    for name, cls in SECTIONS.items():
        build(cls, params[name], name)


def test_sdxl_profile_is_the_guides_recipe(tmp_path):
    demo, sdxl = compose(tmp_path), compose(tmp_path, "profile=sdxl")
    train = sdxl["train"]
    assert train["base"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert train["vae"] == "madebyollin/sdxl-vae-fp16-fix"
    assert (train["resolution"], train["mixed_precision"], train["optimizer"]) == (1024, "bf16", "Adafactor")
    assert train["max_train_steps"] <= 5000
    assert sdxl["evaluate"]["clip_model"] == "ViT-L-14-quickgelu"
    assert sdxl["filter"] == demo["filter"]  # the guide's rules hold in both profiles
    assert {s["name"] for s in sdxl["fetch"]["sources"]} >= {"tmdb_tv", "myanimelist", "pku_posterlayout"}
    # curation on, with the evaluate stage's scorer, a few thousand images shared among clusters
    curate = sdxl["curate"]
    assert curate["enabled"] and curate["clip_model"] == sdxl["evaluate"]["clip_model"] == "ViT-L-14-quickgelu"
    assert curate["aesthetic_head"] == sdxl["evaluate"]["aesthetic_head"]
    assert 1000 <= curate["top_k"] <= 10000 and curate["clusters"] > 1 and curate["min_aesthetic"] is not None
    assert train["captions"] == f"{curate['output']}/images.parquet"


def test_a_single_override_composes_on_top_of_the_profile(tmp_path):
    params = compose(tmp_path, "profile=sdxl", "train.learning_rate=1e-6")
    assert params["train"]["learning_rate"] == 1e-6
    assert params["train"]["optimizer"] == "Adafactor"
