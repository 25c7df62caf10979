"""The end-to-end tests' copy of the project holds its source as the workspace has it, and no pipeline state."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.pipeline_repo import PipelineRepo, pipeline_state, project_files, tool_env

DVC_YAML = """\
stages:
  prepare:
    cmd: python src/prepare.py
    deps:
      - src/prepare.py
      - data/input.csv
    outs:
      - data/prepared.csv
      - ${paths.model}
    metrics:
      - metrics/prepare.json:
          cache: false
    plots:
      - logs/curve.tsv:
          x: step
plots:
  - histogram:
      y:
        data/scores.csv: score
"""


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, env=tool_env(), check=True, capture_output=True)


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A project after a run and some editing: committed source, a committed dvc.lock, then changes."""
    root = tmp_path / "project"
    committed = {
        "dvc.yaml": DVC_YAML,
        "params.yaml": "paths:\n  model: models/model.bin\n",
        ".gitignore": "*.log\n",
        "src/prepare.py": "print('committed')\n",
        "src/gone.py": "print('deleted in the workspace')\n",
        "data/input.csv": "a\n1\n",
        "dvc.lock": "schema: '2.0'\nstages: {}\n",
        "metrics/prepare.json": '{"rows": 1}\n',
    }
    for rel, text in committed.items():
        write(root, rel, text)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline")

    write(root, "src/prepare.py", "print('edited')\n")  # a working change to tracked source
    (root / "src/gone.py").unlink()
    write(root, "src/staged.py", "print('staged')\n")
    git(root, "add", "src/staged.py")
    write(root, "src/new_module.py", "print('new')\n")  # untracked, in a source folder
    write(root, "data/new_input.csv", "b\n2\n")
    # what a run leaves: a stale lock (auto-staged, as dvc does), outputs, metrics, plots, logs
    write(root, "dvc.lock", "schema: '2.0'\nstages:\n  prepare:\n    outs: []\n")
    git(root, "add", "dvc.lock")
    write(root, "data/prepared.csv", "a\n1\n")
    write(root, "data/scores.csv", "score\n0.5\n")
    write(root, "models/model.bin", "weights")
    write(root, "metrics/prepare.json", '{"rows": 2}\n')
    write(root, "metrics/undeclared.json", "{}\n")
    write(root, "logs/curve.tsv", "step\tloss\n0\t1.0\n")
    write(root, "dvclive/metrics.json", "{}\n")
    write(root, "dvc_plots/index.html", "<html></html>\n")
    write(root, "src/run.log", "ignored by .gitignore\n")
    write(root, "notes.txt", "untracked, outside every source folder\n")
    return root


def test_pipeline_state_is_every_declared_output_and_the_run_records(workspace):
    state = pipeline_state(workspace)
    declared = {"data/prepared.csv", "models/model.bin", "metrics/prepare.json", "logs/curve.tsv", "data/scores.csv"}
    assert declared | {"dvc.lock", "metrics", "dvclive"} <= state
    assert not {"src", "data", "data/input.csv", "params.yaml", "dvc.yaml"} & state


def test_copy_is_the_source_as_the_workspace_has_it_and_no_pipeline_state(workspace):
    assert project_files(workspace) == [
        ".gitignore",
        "data/input.csv",
        "data/new_input.csv",
        "dvc.yaml",
        "params.yaml",
        "src/new_module.py",
        "src/prepare.py",
        "src/staged.py",
    ]


def test_copy_of_project_carries_working_changes_and_commits_them(workspace, tmp_path):
    repo = PipelineRepo.copy_of_project(tmp_path / "copy", source=workspace)
    assert (repo.root / "src/prepare.py").read_text() == "print('edited')\n"
    assert not (repo.root / "dvc.lock").exists() and not (repo.root / "metrics").exists()
    assert repo.run("git", "status", "--porcelain").stdout == ""


def test_unresolvable_template_is_one_clear_error(workspace):
    (workspace / "params.yaml").write_text("paths: {}\n")
    with pytest.raises(ValueError, match=r"cannot resolve \$\{paths.model\}"):
        pipeline_state(workspace)
