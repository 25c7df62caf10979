"""Under real DVC, fetch is stale when any of its sources changes: a new row in a source
table, a new file in a source folder (``fetch.source_dir`` is the stage's dep)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.pipeline_repo import PipelineRepo

pytestmark = pytest.mark.slow


def fetch_status(repo: PipelineRepo) -> dict:
    return json.loads(repo.dvc("status", "--json", "fetch").stdout or "{}")


def test_a_changed_source_makes_fetch_stale(tmp_path):
    repo = PipelineRepo.copy_of_project(tmp_path / "repo")
    repo.dvc("repro", "--single-item", "fetch")
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]["fetch"]
    assert "data/demo" in {dep["path"] for dep in lock["deps"]}
    assert fetch_status(repo) == {}

    table = repo.root / "data/demo/tmdb_posters.csv"
    original = table.read_text()
    with table.open("a") as f:
        f.write("999999,A New Poster,One more row.,Drama,/6GncfBAepfJBd0Kh8oOOL8dKLzd.jpg\n")
    assert fetch_status(repo) == {"fetch": [{"changed deps": {"data/demo": "modified"}}]}

    table.write_text(original)
    assert fetch_status(repo) == {}
    posters = repo.root / "data/demo/posters"
    (posters / "new.jpg").write_bytes((posters / "6GncfBAepfJBd0Kh8oOOL8dKLzd.jpg").read_bytes())
    assert fetch_status(repo) == {"fetch": [{"changed deps": {"data/demo": "modified"}}]}


def test_a_source_outside_source_dir_is_one_line(tmp_path):
    repo = PipelineRepo.copy_of_project(tmp_path / "repo")
    params = yaml.safe_load((repo.root / "params.yaml").read_text())
    params["fetch"]["sources"][0]["path"] = "elsewhere/tmdb_posters.csv"
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = repo.run("python", "-m", "stages.fetch", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fetch: error: param fetch.sources[demo_tmdb].path: elsewhere/tmdb_posters.csv is not inside "
        "fetch.source_dir (data/demo), the folder dvc.yaml tracks"
    )
