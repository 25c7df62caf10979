"""Filter: every rule at its boundary, the reason order, the missing-dpi policy, and the stage end to end."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from postertune.dedupe.params import DedupeParams
from postertune.dedupe.run import run as run_dedupe
from postertune.filter.params import FilterParams
from postertune.filter.run import RULES, apply_filter, failing_rules
from postertune.params import ParamError, build
from tests.raw_tables import PROJECT, demo_images, write_raw

GUIDE = FilterParams(min_aspect=0.5, max_aspect=2.0)
KB = 1024


def image(width=600, height=900, kb_per_pixel=0.001, dpi=None, fmt="JPEG", **extra) -> dict:
    return {"width": width, "height": height, "bytes": round(kb_per_pixel * KB * width * height), "dpi": dpi,
            "format": fmt, **extra}  # fmt: skip


def verdicts(rows: list[dict], params: FilterParams = GUIDE) -> list[str | None]:
    """The first failing rule of each row, or None where it is kept."""
    fails = failing_rules(pd.DataFrame(rows), params)
    return [next((rule for rule in RULES if row[rule]), None) for _, row in fails.iterrows()]


def test_sides_are_kept_from_min_side_to_max_side_inclusive():
    rows = [image(512, 768), image(1024, 1024), image(512, 512), image(700, 1024),
            image(511, 768), image(768, 511), image(1025, 1024), image(1024, 1025)]  # fmt: skip
    assert verdicts(rows) == [None, None, None, None, "too_small", "too_small", "too_large", "too_large"]


def test_kb_per_pixel_at_the_threshold_is_kept_one_byte_less_is_dropped():
    at = {"width": 600, "height": 900, "bytes": 276_480, "dpi": None, "format": "JPEG"}  # 270 KB / 540,000 px
    assert at["bytes"] / KB / (600 * 900) == 0.0005
    below = {**at, "bytes": at["bytes"] - 1}
    assert verdicts([at, below]) == [None, "low_kb_per_pixel"]


def test_dpi_96_is_kept_and_95_9_is_dropped():
    assert verdicts([image(dpi=96.0), image(dpi=95.9), image(dpi=300.0)]) == [None, "low_dpi", None]


def test_missing_dpi_policy_both_ways_and_counted_either_way():
    rows = pd.DataFrame([image(dpi=None), image(dpi=None), image(dpi=120.0)])
    keep = apply_filter(rows, replace(GUIDE, missing_dpi="keep"))
    assert keep.metrics["kept"] == 3 and keep.metrics["missing_dpi"] == 2 and keep.metrics["missing_dpi_kept"] == 2
    drop = apply_filter(rows, replace(GUIDE, missing_dpi="drop"))
    assert drop.metrics["kept"] == 1 and drop.metrics["missing_dpi"] == 2 and drop.metrics["missing_dpi_kept"] == 0
    assert drop.dropped["filter_reason"].tolist() == ["missing_dpi", "missing_dpi"]
    assert drop.kept["dpi"].tolist() == [120.0]


def test_aspect_bounds_are_inclusive():
    params = replace(GUIDE, min_aspect=0.6, max_aspect=1.0)
    rows = [image(600, 1000), image(599, 1000), image(800, 800), image(801, 800)]
    assert verdicts(rows, params) == [None, "aspect", None, "aspect"]


def test_only_allowed_formats_pass():
    rows = [image(fmt="JPEG"), image(fmt="PNG"), image(fmt="GIF"), image(fmt="BMP")]
    assert verdicts(rows) == [None, None, "format", "format"]
    assert verdicts(rows, replace(GUIDE, allowed_formats=("PNG",))) == ["format", None, "format", "format"]


def test_first_failing_rule_is_the_reason_and_all_failing_rules_are_listed():
    rows = pd.DataFrame([
        image(1100, 1650, kb_per_pixel=0.0001, dpi=72.0, fmt="GIF", sha256="a"),
        image(400, 600, kb_per_pixel=0.0001, sha256="b"),
        image(600, 900, dpi=72.0, sha256="c"),
        image(600, 900, sha256="d"),
    ])  # fmt: skip
    result = apply_filter(rows, GUIDE)
    dropped = result.dropped.set_index("sha256")
    assert dropped.loc["a", "filter_reason"] == "format"
    assert list(dropped.loc["a", "filter_reasons"]) == ["format", "too_large", "low_kb_per_pixel", "low_dpi"]
    assert list(dropped.loc["b", "filter_reasons"]) == ["too_small", "low_kb_per_pixel"]
    assert dropped.loc["c", "filter_reason"] == "low_dpi"
    assert result.kept["sha256"].tolist() == ["d"]
    assert result.metrics["dropped_by_rule"] == {**dict.fromkeys(RULES, 0), "format": 1, "too_small": 1, "low_dpi": 1}
    assert result.metrics["failing_by_rule"]["low_kb_per_pixel"] == 2
    assert result.metrics["images_in"] == 4 and result.metrics["dropped"] == 3


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"min_side": 0}, "filter.min_side"),
        ({"min_side": 600, "max_side": 512}, "filter.max_side"),
        ({"min_kb_per_pixel": -0.1}, "filter.min_kb_per_pixel"),
        ({"min_dpi": "96"}, "filter.min_dpi"),
        ({"missing_dpi": "ignore"}, "filter.missing_dpi"),
        ({"min_aspect": 0}, "filter.min_aspect"),
        ({"min_aspect": 0.8, "max_aspect": 0.7}, "filter.max_aspect"),
        ({"allowed_formats": []}, "filter.allowed_formats"),
        ({"allowed_formats": ["JPEG", "jpg"]}, "filter.allowed_formats[1]"),
        ({"min_sides": 512}, "filter.min_sides"),
    ],
)
def test_bad_params_name_the_parameter(values, name):
    with pytest.raises(ParamError) as error:
        build(FilterParams, values, "filter")
    assert error.value.name == name
    assert "\n" not in str(error.value)


def test_committed_params_follow_the_guide():
    params = build(FilterParams, yaml.safe_load((PROJECT / "params.yaml").read_text())["filter"], "filter")
    assert (params.min_side, params.max_side, params.min_kb_per_pixel, params.min_dpi) == (512, 1024, 0.0005, 96)


# --- the stage -------------------------------------------------------------------------------


def run_stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env, capture_output=True, text=True)


def write_params(cwd: Path, **overrides) -> None:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["filter"].update(overrides)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def deduplicated_demo(tmp_path_factory) -> Path:
    """The demo set after fetch and dedupe, as ``data/dedup/images.parquet`` in a work folder."""
    root = tmp_path_factory.mktemp("demo")
    write_raw(root, demo_images())
    tables = dict(table=root / "data/raw/images.parquet", shards=root / "data/raw/shards", output=root / "data/dedup")
    run_dedupe(DedupeParams(**tables))
    return root


@pytest.mark.slow
def test_stage_on_the_demo_set_fires_every_rule(deduplicated_demo):
    write_params(deduplicated_demo)
    done = run_stage("filter", deduplicated_demo)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((deduplicated_demo / "metrics/filter.json").read_text())
    dedup = pd.read_parquet(deduplicated_demo / "data/dedup/images.parquet")
    assert metrics["images_in"] == (dedup["dedupe_status"] == "kept").sum() == 16
    assert metrics["kept"] == 10 and metrics["dropped"] == 6
    assert all(metrics["dropped_by_rule"][rule] == 1 for rule in RULES if rule != "missing_dpi")
    assert metrics["missing_dpi"] > metrics["kept"] / 2 and metrics["dropped_by_rule"]["missing_dpi"] == 0

    kept = pd.read_parquet(deduplicated_demo / "data/filtered/images.parquet")
    dropped = pd.read_parquet(deduplicated_demo / "data/filtered/dropped.parquet")
    assert kept["sha256"].is_unique and len(kept) == 10
    assert set(kept.columns) == set(dedup.columns)  # every column carried
    assert set(dropped["filter_reason"]) == set(RULES) - {"missing_dpi"}
    assert not set(kept["sha256"]) & set(dropped["sha256"])

    write_params(deduplicated_demo, missing_dpi="drop")
    assert run_stage("filter", deduplicated_demo).returncode == 0
    metrics = json.loads((deduplicated_demo / "metrics/filter.json").read_text())
    assert metrics["dropped_by_rule"]["missing_dpi"] > 0 and metrics["missing_dpi_kept"] == 0


@pytest.mark.slow
def test_stage_reports_bad_params_and_missing_input_in_one_line(tmp_path):
    write_params(tmp_path, min_dpi=-5)
    bad = run_stage("filter", tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "filter: error: param filter.min_dpi: must not be negative, got -5.0"

    write_params(tmp_path)
    missing = run_stage("filter", tmp_path)
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == "filter: error: data/dedup/images.parquet: file not found (run the dedupe stage first)"
    )


def _limited_file_size(limit: int):
    """In the child: files may not grow past ``limit`` bytes (the kernel refuses the write, as a
    full disk does), and the refusal is an error rather than a signal."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_an_output_the_machine_refuses_is_one_line_and_leaves_no_partial_file(deduplicated_demo, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(deduplicated_demo / "data/dedup", work / "data/dedup")
    write_params(work)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    full = subprocess.run(
        [sys.executable, "-m", "stages.filter"], cwd=work, env=env, capture_output=True, text=True,
        preexec_fn=_limited_file_size(1024),
    )  # fmt: skip
    assert full.returncode == 2
    assert full.stderr.strip() == "filter: error: data/filtered/images.parquet: cannot write: File too large"
    assert list((work / "data/filtered").iterdir()) == []  # no partial or temporary file


def test_a_read_only_output_folder_is_one_line(deduplicated_demo, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(deduplicated_demo / "data/dedup", work / "data/dedup")
    write_params(work)
    (work / "data/filtered").mkdir(parents=True)
    # the immutable attribute refuses writes even to root, which ignores permission bits
    if subprocess.run(["chattr", "+i", str(work / "data/filtered")], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable attribute (chattr)")
    try:
        done = run_stage("filter", work)
    finally:
        subprocess.run(["chattr", "-i", str(work / "data/filtered")], check=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "filter: error: data/filtered/images.parquet: cannot write: Operation not permitted"
    assert list((work / "data/filtered").iterdir()) == []
