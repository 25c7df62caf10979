"""The committed prompt file and the named negative-prompt presets it refers to."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from postertune.errors import PipelineError

PROMPT_COLUMNS = ("id", "category", "negative", "prompt")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PRESET_SEPARATOR = "+"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str
    negative_presets: tuple[str, ...]  # empty: the params' default presets apply


def load_presets(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: negative-prompt presets file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise PipelineError(f"{path}: expected a mapping of preset name to negative prompt")
    for name, text in data.items():
        if not isinstance(name, str) or not ID_PATTERN.match(name):
            raise PipelineError(f"{path}: preset name {name!r} must be lower-case letters, digits, _ or -")
        if not isinstance(text, str) or not text.strip():
            raise PipelineError(f"{path}: preset {name!r} is not a non-empty string")
    return data


def _terms(text: str) -> list[str]:
    return [t.strip().rstrip(".").strip() for t in text.split(",") if t.strip().rstrip(".").strip()]


def combine_negative(names: tuple[str, ...] | list[str], presets: dict[str, str], free_text: str = "") -> str:
    """Join the named presets' terms in order, each term once, then the free text."""
    seen: dict[str, None] = {}
    for name in names:
        for term in _terms(presets[name]):
            seen.setdefault(term, None)
    for term in _terms(free_text):
        seen.setdefault(term, None)
    return ", ".join(seen)


def check_preset_names(names: list[str] | tuple[str, ...], presets: dict[str, str], where: str) -> None:
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise PipelineError(f"{where}: unknown negative preset {unknown[0]!r} (known: {', '.join(presets)})")


def load_prompts(path: Path, presets: dict[str, str]) -> list[Prompt]:
    """Read and check every row; the first bad row stops with its line number."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise PipelineError(f"{path}: prompt file not found") from None
    prompts: list[Prompt] = []
    seen: set[str] = set()
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in PROMPT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: missing column {missing[0]!r} (expected {', '.join(PROMPT_COLUMNS)})")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row or any(row[c] is None for c in PROMPT_COLUMNS):
                raise PipelineError(f"{where}: expected {len(reader.fieldnames)} fields")
            prompt_id = row["id"].strip()
            if not ID_PATTERN.match(prompt_id):
                raise PipelineError(f"{where}: id {prompt_id!r} must be lower-case letters, digits, _ or -")
            if prompt_id in seen:
                raise PipelineError(f"{where}: duplicate id {prompt_id!r}")
            text = row["prompt"].strip()
            if not text:
                raise PipelineError(f"{where}: empty prompt for id {prompt_id!r}")
            category = row["category"].strip()
            if not category:
                raise PipelineError(f"{where}: empty category for id {prompt_id!r}")
            names = tuple(n.strip() for n in row["negative"].split(PRESET_SEPARATOR) if n.strip())
            check_preset_names(names, presets, where)
            seen.add(prompt_id)
            prompts.append(Prompt(prompt_id, category, text, names))
    if not prompts:
        raise PipelineError(f"{path}: no prompts")
    return prompts


def select_prompts(prompts: list[Prompt], ids: list[str], where: str) -> list[Prompt]:
    """Keep the prompts named in ``ids`` (in file order); an empty list keeps all."""
    if not ids:
        return prompts
    known = {p.id for p in prompts}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise PipelineError(f"{where}: prompt id {unknown[0]!r} is not in the prompt file")
    wanted = set(ids)
    return [p for p in prompts if p.id in wanted]
