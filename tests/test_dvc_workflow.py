"""The DVC workflow end to end on the demo profile: repro, plots, resume, S3 remote,
experiments, PR report.

One reproduced copy of the project is shared by the tests of this module; each test that
changes things works in its own git clone that borrows the reproduced copy's DVC cache. A
second copy reproduces at the same time, for the byte-identity test: each runs on one thread.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

from tests.pipeline_repo import PipelineRepo, tool_env

pytestmark = pytest.mark.slow

GUIDANCE_KEY = "sample.guidance_scale"
STEPS_KEY = "sample.steps"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def second_run(tmp_path_factory) -> tuple[PipelineRepo, subprocess.Popen]:
    repo = PipelineRepo.copy_of_project(tmp_path_factory.mktemp("again"))
    repo.env = tool_env(**ONE_THREAD)
    return repo, repo.start_dvc("repro")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, second_run) -> PipelineRepo:
    repo = PipelineRepo.copy_of_project(tmp_path_factory.mktemp("pipeline"))
    repo.env = tool_env(**ONE_THREAD)
    repo.dvc("repro")
    repo.commit_all("reproduce the demo pipeline")
    repo.env = tool_env()
    return repo


def clone_with_shared_cache(source: PipelineRepo, dest: Path) -> PipelineRepo:
    source.run("git", "clone", "-q", str(source.root), str(dest))
    clone = PipelineRepo(dest, source.env)
    clone.dvc("cache", "dir", "--local", str(source.root / ".dvc" / "cache"))
    clone.dvc("checkout")
    return clone


def use_remote(repo: PipelineRepo, endpoint: str) -> None:
    # --local: the server lives only as long as its test, so no clone made by another test may see it
    repo.dvc("remote", "add", "--local", "-d", "storage", "s3://posters/dvc")
    repo.dvc("remote", "modify", "--local", "storage", "endpointurl", endpoint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_repro_writes_every_stage_metrics_and_second_repro_does_nothing(reproduced):
    for stage in yaml.safe_load((reproduced.root / "dvc.yaml").read_text())["stages"]:
        metrics = json.loads((reproduced.root / "metrics" / f"{stage}.json").read_text())
        assert metrics, stage
    again = reproduced.dvc("repro")
    assert "Data and pipelines are up to date" in again.stdout
    assert "Running stage" not in again.stdout
    status = reproduced.dvc("status")
    assert "Data and pipelines are up to date" in status.stdout


def test_demo_trains_the_configured_steps_and_plots_show_the_loss_curve(reproduced):
    metrics = json.loads((reproduced.root / "metrics/train.json").read_text())
    params = yaml.safe_load((reproduced.root / "params.yaml").read_text())["train"]
    assert metrics["steps"] == params["max_train_steps"]
    assert metrics["images_seen"] == params["max_train_steps"] * params["batch_size"]
    shown = reproduced.dvc("plots", "show", "--json").stdout
    for plot in ("metrics/train/loss.tsv", "metrics/val/loss.tsv", "images/prompt-0"):
        assert f"dvclive/train/plots/{plot}" in shown, plot
    rows = (reproduced.root / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + params["max_train_steps"]


def test_longer_run_resumes_from_the_persisted_checkpoint(reproduced, tmp_path):
    repo = clone_with_shared_cache(reproduced, tmp_path / "repo")
    shutil.copytree(reproduced.root / "models/checkpoints", repo.root / "models/checkpoints")  # workspace state
    params_file = repo.root / "params.yaml"
    steps = yaml.safe_load(params_file.read_text())["train"]["max_train_steps"] + 4
    params_file.write_text(
        params_file.read_text().replace(f"max_train_steps: {steps - 4}", f"max_train_steps: {steps}")
    )
    out = repo.dvc("repro", "--single-item", "train")
    assert "resuming from" in out.stderr + out.stdout
    rows = (repo.root / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + steps and rows[-1].split("\t")[0] == str(steps)
    metrics = json.loads((repo.root / "metrics/train.json").read_text())
    assert metrics["steps"] == steps


def test_two_runs_of_the_same_code_and_data_write_identical_outputs(reproduced, second_run):
    """Byte for byte, shards, models and tables included, so DVC sees no change where nothing
    changed. Only the run reports (metrics and logs, which hold timings) may differ."""
    again, proc = second_run
    again.finish(proc)

    def outputs(repo: PipelineRepo) -> dict[str, str]:
        lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
        return {
            out["path"]: out["md5"]
            for stage in lock["stages"].values()
            for out in stage.get("outs", [])
            if not out["path"].startswith(("metrics/", "dvclive/"))
        }

    first, second = outputs(reproduced), outputs(again)
    assert len(first) > 15 and "data/raw/shards" in first
    assert {path for path in first if first[path] != second.get(path)} == set()


def test_push_to_s3_then_fresh_clone_pulls_clean(reproduced, tmp_path):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        creds = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="posters")
        reproduced.env.update(creds)
        use_remote(reproduced, endpoint)
        reproduced.dvc("push")

        reproduced.run("git", "clone", "-q", str(reproduced.root), str(tmp_path / "fresh"))
        fresh = PipelineRepo(tmp_path / "fresh", tool_env(**creds))
        use_remote(fresh, endpoint)
        assert not (fresh.root / "data" / "raw" / "images.parquet").exists()
        fresh.dvc("pull")
        assert (fresh.root / "models" / "unet").is_dir()
        status = fresh.dvc("status")
        assert "Data and pipelines are up to date" in status.stdout, status.stdout
        again = fresh.dvc("repro")
        assert "Running stage" not in again.stdout, again.stdout
    finally:
        server.stop()


@pytest.fixture(scope="module")
def experiments(reproduced, tmp_path_factory) -> PipelineRepo:
    """An experiment queued and run by the queue (in a copy of its own), in a clone: a sampler
    setting, so that only the sample and evaluate stages run again."""
    repo = clone_with_shared_cache(reproduced, tmp_path_factory.mktemp("experiments") / "repo")
    repo.dvc("exp", "run", "--queue", "-n", "guidance-high", "-S", f"{GUIDANCE_KEY}=9.0", "-S", f"{STEPS_KEY}=3")
    repo.dvc("queue", "start", "-j", "1")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = repo.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    else:
        pytest.fail(f"queued experiments did not finish:\n{status}")
    assert "Failed" not in status, repo.dvc("queue", "logs", "guidance-high", check=False).stdout
    return repo


@pytest.mark.timeout(1200)
def test_queued_experiment_shows_its_params_and_metric_diffs(experiments):
    repo = experiments
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    names = {exp.get("name") for rev in shown for exp in (rev.get("experiments") or [])}
    assert "guidance-high" in names, names

    diff = json.loads(repo.dvc("metrics", "diff", "HEAD", "guidance-high", "--json").stdout)
    evaluate = diff.get("metrics/evaluate.json", {})
    assert evaluate, diff
    assert any(v.get("diff") not in (0, None) for v in evaluate.values()), evaluate
    params = json.loads(repo.dvc("params", "diff", "HEAD", "guidance-high", "--json").stdout)["params.yaml"]
    assert params[GUIDANCE_KEY]["new"] == 9.0 and params[STEPS_KEY]["new"] == 3
    assert "guidance-high" in repo.dvc("exp", "show", "--md").stdout


@pytest.mark.timeout(1200)
def test_pr_report_against_base_commit(experiments):
    repo = experiments
    base = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    repo.dvc("exp", "apply", "guidance-high")
    repo.commit_all("raise the guidance scale")

    repo.run("bash", "scripts/pr_report.sh", base, "pr-report")
    report = (repo.root / "pr-report" / "report.md").read_text()
    assert "## Metrics" in report and "metrics/evaluate.json" in report
    assert GUIDANCE_KEY.split(".")[-1] in report
    grids = list((repo.root / "pr-report" / "grids").glob("*.png"))
    assert grids and all(f"grids/{g.name}" in report for g in grids)
    specs = list((repo.root / "pr-report" / "vega").glob("*.json"))
    assert specs, report
    spec = json.loads(specs[0].read_text())
    assert "$schema" in spec and "vega-lite" in spec["$schema"]
