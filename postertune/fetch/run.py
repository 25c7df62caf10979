"""The fetch stage's work: sources in, ``images.parquet`` and the shard store out.

Every source is read (and every param checked) before the first request. URLs already
in the journal are not fetched again (a local file whose size or modification time
changed is read again; an image measured under another recipe is measured again from
the store); each distinct URL is fetched once however many rows name it. The table has
one row per source row, in source order then row order, so a run that was killed and
resumed writes the same table as one that was not.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from postertune.atomic import write_parquet
from postertune.fetch.engine import Outcome, remeasure, run_fetch_engine
from postertune.fetch.journal import Journal, Remeasure
from postertune.fetch.local import local_stamp
from postertune.fetch.params import FetchParams
from postertune.fetch.sources import Entry, read_source
from postertune.fetch.urls import LocalTarget
from postertune.imagefacts import recipe
from postertune.store import ShardStore

IMAGE_COLUMNS = ["width", "height", "format", "dpi", "jpeg_quality", "phash", "bytes", "status", "reason"]
DTYPES = {"row": "int64", "width": "Int64", "height": "Int64", "dpi": "float64", "jpeg_quality": "Int64",
          "bytes": "Int64"}  # fmt: skip


def run(params: FetchParams) -> dict:
    """Fetch every source of ``params``; write the table; return the stage metrics."""
    shards = params.shards
    read = [(source, read_source(source, params.allowed_schemes)) for source in params.sources]
    entries = [entry for _, rows in read for entry in rows.entries]

    store = ShardStore(shards)
    stored = set(store.index)
    journal = Journal(shards, recipe(params.background))
    journalled, older = journal.load(stored)
    known: dict[str, Outcome] = {}
    to_measure: dict[str, Remeasure] = {}
    to_fetch: dict[str, LocalTarget | None] = {}  # insertion-ordered
    reused = 0
    for entry in entries:
        url = entry.url
        if entry.rejected is not None or url in known or url in to_measure or url in to_fetch:
            continue
        stamp = local_stamp(entry.local) if entry.local else ""
        image = journalled.get(url)
        if image is not None and image.stamp == stamp:
            known[url] = Outcome(url, image)
            reused += 1
        elif url in older and older[url].stamp == stamp:
            to_measure[url] = older[url]
        else:
            to_fetch[url] = entry.local

    with store:
        measured = remeasure(to_measure, store, params)
    journal.append([outcome.image for outcome in measured.values() if outcome.image is not None])
    known.update(measured)
    engine = run_fetch_engine(list(to_fetch.items()), params, shards, stored)
    known.update(engine.outcomes)
    metadata_names = list(dict.fromkeys(name for source, _ in read for name in source.metadata_columns))
    table = build_table(entries, known, metadata_names)
    write_parquet(params.table, table)
    return fetch_metrics(table, read, engine.requests, len(to_fetch), reused, len(to_measure), engine.seconds)


def build_table(entries: list[Entry], outcomes: dict[str, Outcome], metadata_names: list[str]) -> pd.DataFrame:
    """One row per entry, built a column at a time: a million rows never become a million dicts."""
    images = [None if entry.rejected else outcomes[entry.url].image for entry in entries]
    reasons = [entry.rejected or outcomes[entry.url].reason for entry in entries]
    columns: dict[str, list] = {
        "sha256": [image.sha256 if image else None for image in images],
        "source": [entry.source for entry in entries],
        "url": [entry.url for entry in entries],
        "row": [entry.row for entry in entries],
    }
    for name in metadata_names:
        columns[name] = [entry.metadata.get(name) for entry in entries]
    for column in IMAGE_COLUMNS[:-2]:
        columns[column] = [getattr(image, column) if image else None for image in images]
    columns["status"] = ["failed" if image is None else "ok" for image in images]
    columns["reason"] = reasons
    return pd.DataFrame(columns).astype(DTYPES)


def fetch_metrics(
    table: pd.DataFrame, read: list, requests: int, fetched: int, reused: int, remeasured: int, seconds: float
) -> dict:
    ok = table[table["status"] == "ok"]
    distinct = ok.drop_duplicates("sha256")
    return {
        "rows": len(table),
        "skipped_empty_url": sum(rows.skipped_empty_url for _, rows in read),
        "status": {"ok": len(ok), "failed": len(table) - len(ok)},
        "reason": dict(sorted(Counter(r.split(":", 1)[0] for r in table["reason"].dropna()).items())),
        "source_ok": {source.name: int((ok["source"] == source.name).sum()) for source, _ in read},
        "distinct_images": len(distinct),
        "bytes": int(distinct["bytes"].sum()),
        "run": {
            "urls_fetched": fetched,
            "urls_reused": reused,
            "urls_remeasured": remeasured,  # journalled under another recipe: measured again from the store
            "requests": requests,
            "seconds": round(seconds, 3),
            "images_per_s": round(fetched / seconds, 1) if seconds > 0 else 0.0,
        },
    }
