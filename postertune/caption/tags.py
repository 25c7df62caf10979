"""How tags are written and compared."""

from __future__ import annotations

import re

# Kaomoji such as ^_^, o_o or (o)_(o) use the underscore as a mouth: only tags that
# contain a word of two letters or more are rewritten with spaces.
_WORDY = re.compile(r"[^\W\d_]{2}")


def tag_key(tag: str) -> str:
    """Case and underscore-versus-space do not make two tags different."""
    return " ".join(tag.replace("_", " ").lower().split())


def display_tag(tag: str, replace_underscores: bool) -> str:
    return tag.replace("_", " ") if replace_underscores and _WORDY.search(tag) else tag


def unique_tags(tags: list[str]) -> list[str]:
    """``tags`` stripped, without empties and repeats (first one wins), order kept."""
    seen: set[str] = set()
    unique = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            unique.append(tag.strip())
    return unique
