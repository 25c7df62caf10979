"""scripts/check_metrics.py: reproduced metrics against the committed baseline, per-metric tolerances."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_repo import PipelineRepo

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "scripts/check_metrics.py"

spec = importlib.util.spec_from_file_location("check_metrics", SCRIPT)
check_metrics = importlib.util.module_from_spec(spec)
sys.modules.setdefault("check_metrics", check_metrics)
spec.loader.exec_module(check_metrics)


def entry(old, new) -> dict:
    return {"old": old, "new": new}


def test_timings_are_ignored_and_counts_exact():
    diff = {
        "metrics/fetch.json": {
            "run.seconds": entry(0.14, 9.5),
            "run.images_per_s": entry(162.2, 3.0),
            "rows": entry(23, 23),
            "status.ok": entry(21, 20),
        },
        "metrics/train.json": {"peak_memory_mb": entry(1254.9, 2048.0), "steps": entry(50, 50)},
    }
    assert check_metrics.problems(diff) == [
        "metrics/fetch.json: status.ok: committed 21, reproduced 20 (tolerance: exact)"
    ]


def test_float_metrics_move_within_their_tolerance_only():
    rule = check_metrics.tolerance("metrics/train.json", "train_loss")
    assert not rule.ignored and rule.rel > 0
    near, far = 0.18 * (1 + rule.rel / 2), 0.18 * (1 + rule.rel * 2)
    assert check_metrics.problems({"metrics/train.json": {"train_loss": entry(0.18, near)}}) == []
    [line] = check_metrics.problems({"metrics/train.json": {"train_loss": entry(0.18, far)}})
    assert line.startswith("metrics/train.json: train_loss: committed 0.18, reproduced")


def test_a_metric_no_rule_names_is_compared_exactly():
    assert check_metrics.tolerance("metrics/new_stage.json", "some.new_value") == check_metrics.EXACT
    diff = {"metrics/new_stage.json": {"some.new_value": entry(0.5, 0.5 + 1e-12), "same": entry("a", "a")}}
    assert check_metrics.problems(diff) == [
        f"metrics/new_stage.json: some.new_value: committed 0.5, reproduced {0.5 + 1e-12!r} (tolerance: exact)"
    ]


def test_metrics_on_one_side_only_are_reported():
    diff = {"metrics/a.json": {"gone": entry(1, None), "new": entry(None, 2), "kept": entry(3, 3)}}
    assert check_metrics.problems(diff) == [
        "metrics/a.json: gone: committed 1, not reproduced",
        "metrics/a.json: new: reproduced 2, not committed at HEAD",
    ]


def test_no_committed_baseline_is_one_clear_error():
    with pytest.raises(ValueError, match="no committed metrics at HEAD") as error:
        check_metrics.problems({"metrics/a.json": {"x": entry(None, 1)}})
    assert "\n" not in str(error.value)


def test_the_script_compares_the_workspace_with_head_through_dvc(tmp_path):
    repo = PipelineRepo(tmp_path)
    repo.run("git", "init", "-q", "-b", "main")
    repo.dvc("init", "-q")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/run.json\n")
    (tmp_path / "metrics").mkdir()
    metrics = tmp_path / "metrics/run.json"
    metrics.write_text(json.dumps({"images": 10, "seconds": 1.5}))

    def check() -> subprocess.CompletedProcess:
        return repo.run(sys.executable, str(SCRIPT), check=False)

    missing = check()
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "check_metrics: error: no committed metrics at HEAD to compare with: commit dvc.lock and the metrics of a run"
    ]

    repo.commit_all("baseline")
    metrics.write_text(json.dumps({"images": 10, "seconds": 7.0}))
    assert check().returncode == 0
    metrics.write_text(json.dumps({"images": 9, "seconds": 7.0}))
    moved = check()
    assert moved.returncode == 1
    assert moved.stdout.splitlines() == ["metrics/run.json: images: committed 10, reproduced 9 (tolerance: exact)"]
