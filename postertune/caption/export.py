"""Export the captions in layouts other trainers read, so the dataset trains elsewhere.

- ``kohya_metadata.json``: kohya-ss fine-tuning metadata, ``{key: {"caption", "tags"}}``
  with the image's sha256 as key (kohya keys images by file name without extension).
- ``<sha256>.txt`` sidecars holding one caption each, optionally beside the images
  as ``<sha256>.<ext>``. At full scale these are many loose files, so they are off
  by default.

The folder is built beside the old one and swapped in whole; it always exists (empty
when nothing is exported), because DVC declares it as an output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from postertune.atomic import atomic_dir
from postertune.caption.params import ExportParams
from postertune.errors import PipelineError
from postertune.store import ShardStore

KOHYA_FILE = "kohya_metadata.json"
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def kohya_metadata(captions: pd.DataFrame) -> dict[str, dict[str, str]]:
    return {
        row.sha256: {"caption": row.caption_long, "tags": ", ".join(row.tags)}
        for row in captions.itertuples(index=False)
    }


def _write_folder(folder: Path, captions: pd.DataFrame, params: ExportParams, store: ShardStore) -> None:
    if params.kohya_json:
        text = json.dumps(kohya_metadata(captions), indent=1, ensure_ascii=False)
        (folder / KOHYA_FILE).write_text(text + "\n", encoding="utf-8")
    if params.sidecars != "none":
        for sha, text in zip(captions["sha256"], captions[params.sidecars], strict=True):
            (folder / f"{sha}.txt").write_text(text + "\n", encoding="utf-8")
    if params.images:
        for sha, fmt in zip(captions["sha256"], captions["format"], strict=True):
            extension = EXTENSIONS.get(str(fmt).upper())
            if extension is None:
                raise PipelineError(
                    f"param caption.export.images: image {sha} has format {fmt!r}, not one of {sorted(EXTENSIONS)}"
                )
            (folder / f"{sha}{extension}").write_bytes(store.read(sha))


def export_dataset(folder: Path, captions: pd.DataFrame, params: ExportParams, store: ShardStore) -> None:
    with atomic_dir(folder) as staging:
        staging.chmod(0o755)
        _write_folder(staging, captions, params, store)
