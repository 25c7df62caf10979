"""The project's own import graph, read from the source (``ast``), for the shape tests."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("postertune", "stages")


def module_file(module: str) -> Path | None:
    """The project file that defines ``module`` (a package: its ``__init__.py``), if any."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = PROJECT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Project modules ``path`` imports: everywhere in the file, or only at module level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from package import module" imports the module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if module_file(name) is not None}


def with_parents(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` first."""
    parts = module.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def import_closure(module: str) -> set[Path]:
    """Every project file that importing (and running) ``module`` can execute."""
    seen: set[str] = set()
    todo = list(with_parents(module))
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        for imported in imported_modules(module_file(name)):
            todo.extend(with_parents(imported))
    return {module_file(name) for name in seen}
