"""Combination rules: from each captioner's output to one record per image.

``caption`` (what the guide trains on) is the tag list joined by ", " when the tagger
found tags, otherwise the first fallback caption; either way it opens with the
``prepend_tags`` so ``keep_tokens`` can pin them. ``caption_long`` is the descriptive
one (BLIP or metadata). Both are kept so training can mix long synthetic and short
true captions.
"""

from __future__ import annotations

import pandas as pd

from postertune.caption.cache import CaptionRecord
from postertune.caption.metadata import as_list
from postertune.caption.params import CombineParams
from postertune.caption.tags import unique_tags
from postertune.tables import iter_records

CAPTION_COLUMNS = ["sha256", "caption", "caption_long", "tags", "caption_source", "caption_long_source"]


def _first(texts: dict[str, str], order: list[str]) -> tuple[str, str] | None:
    return next(((texts[name], name) for name in order if name in texts), None)


def combine_row(row: dict, records: dict[str, CaptionRecord], params: CombineParams) -> dict | None:
    """The caption columns for one image, or None when it has no caption or a bad image."""
    if any(r.bad_image for r in records.values()):
        return None
    tagger = records.get("wd14")
    tagger_tags = list(tagger.tags or ()) if tagger is not None and tagger.ok else []
    metadata_tags = [tag for column in params.tag_columns for tag in as_list(row.get(column))]
    tags = unique_tags([*params.prepend_tags, *tagger_tags, *metadata_tags])
    shorts = {name: r.text for name, r in records.items() if r.ok and r.text}
    longs = {name: r.long_text or r.text for name, r in records.items() if r.ok and (r.long_text or r.text)}

    short = (", ".join(tags), "wd14") if tagger_tags else _first(shorts, params.short_fallback)
    long = _first(longs, params.long)
    short = short or long or _first(shorts, list(shorts)) or _first(longs, list(longs))
    if short is None:
        return None
    long = long or short
    return {
        "sha256": row["sha256"],
        "caption": ", ".join(unique_tags([*params.prepend_tags, *short[0].split(",")])),
        "caption_long": long[0],
        "tags": tags,
        "caption_source": short[1],
        "caption_long_source": long[1],
    }


def combine_captions(
    table: pd.DataFrame, results: dict[str, dict[str, CaptionRecord]], params: CombineParams
) -> pd.DataFrame:
    """One row per captioned image: the caption columns, then every input column carried."""
    rows = []  # tuples, not dicts: a fraction of the memory at a million rows
    carried = [c for c in table.columns if c not in CAPTION_COLUMNS]
    for row in iter_records(table):
        records = {name: found[row["sha256"]] for name, found in results.items() if row["sha256"] in found}
        combined = combine_row(row, records, params)
        if combined is not None:
            rows.append((*(combined[c] for c in CAPTION_COLUMNS), *(row[c] for c in carried)))
    return pd.DataFrame(rows, columns=CAPTION_COLUMNS + carried)
