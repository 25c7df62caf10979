"""A throw-away copy of this project as its own git + DVC repository, for end-to-end tests."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]

# What a run leaves behind besides the outputs dvc.yaml declares: never copied, tracked or not.
STATE_PATHS = ("dvc.lock", "metrics", "dvclive", "dvc_plots", ".dvc/cache", ".dvc/tmp")


def git_paths(root: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", *args, "-z"], cwd=root, check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f]


def project_files(root: Path = PROJECT) -> list[str]:
    """The files a test copy of the project at ``root`` holds: its source, as the workspace has it.

    That is every file tracked at HEAD or staged, with its working-tree content, and every untracked,
    not ignored file in a folder that already holds tracked files (a new module or test); never
    pipeline state (``pipeline_state``), whether committed, staged or only in the workspace.
    """
    has_head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True)
    tracked = set(git_paths(root, "ls-files", "--cached"))
    if has_head.returncode == 0:
        tracked |= set(git_paths(root, "ls-tree", "-r", "--name-only", "HEAD"))
    source_dirs = {posixpath.dirname(f) for f in tracked if posixpath.basename(f) != ".gitignore"} - {""}
    untracked = [
        f
        for f in git_paths(root, "ls-files", "--others", "--exclude-standard")
        if any(is_under(f, folder) for folder in source_dirs)
    ]
    state = pipeline_state(root)
    return sorted(
        f for f in tracked.union(untracked) if (root / f).is_file() and not any(is_under(f, s) for s in state)
    )


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def pipeline_state(root: Path = PROJECT) -> set[str]:
    """``STATE_PATHS`` and every output, metrics file and plot that ``dvc.yaml`` declares, as paths."""
    state = set(STATE_PATHS)
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return state
    pipeline = yaml.safe_load(dvc_yaml.read_text()) or {}
    context = template_context(root, pipeline.get("vars", []))
    for name, stage in (pipeline.get("stages") or {}).items():
        stage = stage.get("do", stage)  # a foreach stage keeps its body under "do"
        wdir = resolve(stage.get("wdir", "."), context, name)
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                for path in [entry] if isinstance(entry, str) else list(entry):
                    state.add(posixpath.normpath(posixpath.join(wdir, resolve(path, context, name))))
    for plot in pipeline.get("plots") or []:  # top-level plots: a path, or an id whose y names files
        if isinstance(plot, str):
            state.add(posixpath.normpath(resolve(plot, context, "plots")))
        elif isinstance(plot, dict):
            for definition in plot.values():
                y = definition.get("y") if isinstance(definition, dict) else None
                for path in y if isinstance(y, dict) else []:
                    state.add(posixpath.normpath(resolve(path, context, "plots")))
    return state


def template_context(root: Path, variables: list[Any]) -> dict[str, Any]:
    """What ``${...}`` in dvc.yaml can refer to: params.yaml, then its ``vars`` (files or mappings)."""
    context: dict[str, Any] = {}
    sources: list[Any] = ["params.yaml", *variables]
    for source in sources:
        if isinstance(source, dict):
            context.update(source)
            continue
        file, _, keys = str(source).partition(":")
        path = root / file
        if not path.is_file():
            continue
        data = yaml.safe_load(path.read_text()) or {}
        context.update({k: data[k] for k in keys.split(",") if k in data} if keys else data)
    return context


def resolve(text: str, context: dict[str, Any], where: str) -> str:
    """``text`` with every ``${a.b[0]}`` replaced from ``context``, as DVC templating does."""

    def lookup(match: re.Match) -> str:
        value: Any = context
        for part in re.findall(r"[^.\[\]]+", match.group(1).strip()):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise ValueError(f"dvc.yaml {where}: cannot resolve {match.group(0)} to find pipeline outputs")
        return str(value)

    return re.sub(r"\$\{([^}]*)\}", lookup, str(text))


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class PipelineRepo:
    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = root
        self.env = env or tool_env()

    @classmethod
    def copy_of_project(cls, root: Path, source: Path = PROJECT) -> PipelineRepo:
        for rel in project_files(source):
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest)
        repo = cls(root)
        repo.run("git", "init", "-q", "-b", "main")
        repo.run("git", "add", "-A")
        repo.run("git", "commit", "-qm", "pipeline")
        return repo

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("dvc", *args, **kw)

    def start_dvc(self, *args: str) -> subprocess.Popen:
        """``dvc *args`` in the background; ``finish`` waits for it."""
        return subprocess.Popen(
            ["dvc", *args], cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 900) -> None:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(proc.args)} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
            )

    def commit_all(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)
