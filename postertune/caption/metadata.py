"""The metadata captioner: a template over the source's columns (title, genres, overview).

Source tables are messy: a genre cell may be a real list, a Python or JSON list
literal (``"['Drama', 'Crime']"``, TMDB's ``"[{'id': 18, 'name': 'Drama'}]"``) or plain
text (``"Drama, Crime"``); empty cells arrive as None, NaN or the strings "nan"/"None".
A missing field is dropped together with the separator before it, so a caption never
reads "None", "nan" or ends in a dangling comma.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Mapping

import numpy as np
import pandas as pd

_MISSING_STRINGS = {"", "nan", "none", "null", "<na>", "n/a", "[]"}
_LEADING_JUNK = re.compile(r"^[\s,;:/|·.-]+")
_TRAILING_JUNK = re.compile(r"[\s,;:/|·-]+$")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_COMMA = re.compile(r"(,\s*)+,")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}")
_SPACES = re.compile(r"\s+")
_MAX_LITERAL_CHARS = 10_000


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _is_missing_scalar(value: object) -> bool:
    try:
        return bool(pd.isna(value))  # None, NaN, NaT, pd.NA
    except (TypeError, ValueError):  # not a scalar
        return False


def _items(value: object) -> list[str] | None:
    """The items of a list-like cell, or None when the cell is not list-like."""
    if isinstance(value, (list, tuple, np.ndarray)):
        raw = list(value)
    elif isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        text = value.strip()
        try:
            if len(text) > _MAX_LITERAL_CHARS:
                raise ValueError("too long to parse")
            parsed = ast.literal_eval(text)
            raw = list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raw = [part.strip().strip("'\"") for part in text[1:-1].split(",")]
    else:
        return None
    items = []
    for item in raw:
        if isinstance(item, Mapping):  # TMDB: {"id": 18, "name": "Drama"}
            item = item.get("name")
        if _is_missing_scalar(item):
            continue
        text = _clean(str(item))
        if text.lower() not in _MISSING_STRINGS:
            items.append(text)
    return items


def as_text(value: object) -> str | None:
    """A cell as caption text (list items joined by ", "), or None when it is empty."""
    items = _items(value)
    if items is not None:
        return ", ".join(items) or None
    if _is_missing_scalar(value):
        return None
    text = _clean(str(value))
    return None if text.lower() in _MISSING_STRINGS else text


def as_list(value: object) -> list[str]:
    """A cell as a list of values: list literals are parsed, plain text split on commas."""
    items = _items(value)
    if items is not None:
        return items
    text = as_text(value)
    if text is None:
        return []
    return [part for part in (_clean(p) for p in re.split(r"[,|]", text)) if part.lower() not in _MISSING_STRINGS]


def render_template(template: str, row: Mapping[str, object]) -> str:
    """Fill ``template`` from ``row``; an empty string when every field is missing."""
    pieces: list[str] = []
    found = False
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if name is None:
            continue
        value = as_text(row.get(name))
        if value is None:
            pieces[-1] = _TRAILING_JUNK.sub("", literal) + (" " if literal[:1].isspace() else "")
        else:
            found = True
            pieces.append(value)
    if not found:
        return ""
    text = _clean(_EMPTY_BRACKETS.sub("", "".join(pieces)))
    text = _REPEATED_COMMA.sub(",", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
    return _TRAILING_JUNK.sub("", _LEADING_JUNK.sub("", text))
