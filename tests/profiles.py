"""``params.yaml`` as ``dvc exp run -S profile=…`` composes it from ``conf/``, whatever the workspace holds."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import yaml
from dvc.utils.hydra import compose_and_dump

PROJECT = Path(__file__).resolve().parents[1]


@cache
def _composed_text(profile: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "params.yaml"
        compose_and_dump(out, str(PROJECT / "conf"), None, "config", "", [f"profile={profile}"])
        return out.read_text()


def composed_params(profile: str = "demo") -> dict:
    """A fresh copy of every section, composed for ``profile``."""
    return yaml.safe_load(_composed_text(profile))
