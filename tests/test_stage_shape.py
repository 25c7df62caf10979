"""Every stage has one shape, and dvc.yaml knows everything a stage reads.

``dvc.yaml`` → ``stages/<name>.py`` → ``postertune/<name>/params.py`` (its typed section) and
``postertune/<name>/run.py`` (``run(params) -> metrics``). A stage's data paths are keys of its
own params section, templated into ``dvc.yaml``; its code deps cover every project file it
imports, so editing any of them makes ``dvc status`` report the stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from postertune.params import build
from tests.profiles import composed_params
from tests.project_imports import PROJECT, import_closure, imported_modules, module_file, module_name

DVC_YAML = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = list(DVC_YAML["stages"])
DOMAINS = ("fetch", "dedupe", "filter", "caption", "curate", "train", "lora", "sample", "evaluate")
TEMPLATE = re.compile(r"\$\{([^}]+)\}")
# params paths a stage keeps for itself between runs, not outputs DVC versions; and weights that
# only some profiles name (null in the demo), which a fixed dvc.yaml entry cannot template
WORK_PATHS = {"train.cache_dir", "evaluate.aesthetic_head", "curate.aesthetic_head"}


def entry_path(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def stage_paths(stage: dict, *kinds: str) -> list[str]:
    return [entry_path(e) for kind in kinds for e in stage.get(kind, [])]


def params_class(name: str) -> type:
    module = importlib.import_module(f"postertune.{name}.params")
    return getattr(module, f"{name.capitalize()}Params")


def test_the_pipeline_is_the_domain_stages_in_order():
    assert STAGES == list(DOMAINS)


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_has_the_one_shape(name):
    stage = DVC_YAML["stages"][name]
    assert stage["cmd"] == f"python -m stages.{name}"
    assert stage["params"] == [name]
    for part in ("params", "run"):
        assert module_file(f"postertune.{name}.{part}") is not None, f"postertune/{name}/{part}.py is missing"
    run = importlib.import_module(f"postertune.{name}.run").run
    hints = typing.get_type_hints(run)
    assert list(hints) == ["params", "return"] and hints["params"] is params_class(name)
    assert f"metrics/{name}.json" in stage_paths(stage, "metrics")


@pytest.mark.parametrize("name", STAGES)
def test_dvc_deps_cover_every_project_file_the_stage_imports(name):
    deps = [PROJECT / p for p in stage_paths(DVC_YAML["stages"][name], "deps") if "${" not in p]
    closure = import_closure(f"stages.{name}")
    uncovered = sorted(str(f.relative_to(PROJECT)) for f in closure if not any(f == d or d in f.parents for d in deps))
    assert uncovered == [], f"dvc.yaml stage {name} does not list files it imports"
    stale = sorted(str(d.relative_to(PROJECT)) for d in deps if not d.exists())
    assert stale == []


@pytest.mark.parametrize("name", STAGES)
def test_stage_data_paths_are_keys_of_its_own_params(name):
    stage = DVC_YAML["stages"][name]
    params = composed_params()[name]
    used = set()
    for path in stage_paths(stage, "deps", "outs"):
        if path.startswith(("postertune/", "stages/")):
            continue
        keys = TEMPLATE.findall(path)
        assert keys, f"{name}: {path} is not templated from params"
        assert all(key.split(".")[0] == name for key in keys), f"{name}: {path} reads another stage's params"
        used.update(key.split(".", 1)[1] for key in keys)
    declared = {
        f"{field.name}" for field in dataclasses.fields(params_class(name)) if _is_path(params_class(name), field.name)
    }
    declared |= {f"cmmd.{k}" for k in ("images", "shards")} if name == "evaluate" else set()
    unused = sorted(declared - {u.split("[")[0].split(".")[0] for u in used} - {u for u in used} - _work(name))
    unused = [u for u in unused if not any(x.startswith(u) for x in used)]
    assert unused == [], f"{name}: params paths that dvc.yaml does not track"
    assert params  # the section exists in the composed params


def _work(name: str) -> set[str]:
    return {p.split(".", 1)[1] for p in WORK_PATHS if p.startswith(f"{name}.")}


def _is_path(cls: type, field: str) -> bool:
    hint = typing.get_type_hints(cls)[field]
    return hint is Path or Path in typing.get_args(hint)


def test_domain_packages_meet_only_through_the_shared_kernel():
    crossings = []
    for domain in DOMAINS:
        for path in sorted((PROJECT / "postertune" / domain).glob("*.py")):
            for module in imported_modules(path):
                parts = module.split(".")
                if len(parts) > 1 and parts[1] in DOMAINS and parts[1] != domain:
                    crossings.append(f"{path.relative_to(PROJECT)} imports {module}")
    assert crossings == []


def test_no_import_cycles_at_module_level():
    graph = {}
    for path in sorted((PROJECT / "postertune").rglob("*.py")):
        graph[module_name(path)] = {m for m in imported_modules(path, top_level_only=True) if m != module_name(path)}
    cycles = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]) if nxt in trail else nxt)
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("name", STAGES)
def test_loading_params_imports_no_model_library(name):
    """A bad ``-S`` fails in well under a second: checking params never imports torch."""
    probe = (
        "import sys; from postertune.cli import section; "
        f"from postertune.{name}.params import {name.capitalize()}Params as P; section(P, {name!r}); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _defaults(cls: type) -> dict:
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@pytest.mark.parametrize("name", STAGES)
def test_each_default_lives_in_one_place(name):
    """Every param appears in conf/base.yaml (so ``-S`` can set it and ``dvc params diff`` shows it),
    and where the dataclass has a default too, it is the same value."""
    cls = params_class(name)
    section = composed_params()[name]
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in section)
    assert missing == [], f"conf/base.yaml lacks {name}: {missing}"
    loaded = _plain(build(cls, section, name))
    defaults = {k: _plain(v) for k, v in _defaults(cls).items()}
    differ = {k: (v, loaded[k]) for k, v in defaults.items() if _plain(v) != loaded[k]}
    assert differ == {}, f"{name}: dataclass default and conf/base.yaml differ"
