"""The embedding cache: what one CLIP model made of each image and caption, kept on disk.

A folder per model fingerprint (``postertune.models.clip.clip_fingerprint``) under
``curate.output/cache``; in it, Parquet parts of image rows (keyed by the image's sha256:
its embedding, or why it has none, and the model-free JPEG quality and grey-level spread)
and of text rows (keyed by the caption's sha256). Every chunk of work is one part written
atomically, so an interrupted run keeps all it scored; processes of one launch write side
by side, each part's name marked with its process (``images-000003-r1``). ``compact``
folds the parts into one at the end. A rerun with other thresholds finds everything here
and loads no model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from postertune.atomic import atomic_path, write_json
from postertune.errors import PipelineError
from postertune.fingerprint import SHORT

IMAGE_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("jpeg_quality", pa.int16()),
        ("pixel_std", pa.float64()),
        ("skip", pa.string()),
    ]
)
TEXT_SCHEMA = pa.schema([("sha256", pa.string()), ("embedding", pa.list_(pa.float32()))])
_PART = re.compile(r"^(images|texts)-(\d{6,})(-r\d+)?\.parquet$")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    sha256: str
    embedding: np.ndarray | None = None  # float32, L2-normalised
    jpeg_quality: int | None = None  # JPEG only
    pixel_std: float | None = None
    skip: str | None = None  # why the image could not be scored (e.g. unreadable: truncated)


class EmbeddingCache:
    def __init__(self, root: Path, fingerprint: str, about: dict, suffix: str = ""):
        self.folder = Path(root) / fingerprint[:SHORT]
        self.fingerprint = fingerprint
        self.about = about
        self.suffix = suffix  # marks the parts this process writes (launch.Processes.suffix)
        self.reload()

    def reload(self) -> None:
        """Read every part in the folder, those other processes wrote included."""
        self.images: dict[str, ImageRecord] = {}
        self.texts: dict[str, np.ndarray] = {}
        for kind, part in self._parts():
            try:
                table = pq.read_table(part).to_pylist()
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise PipelineError(
                    f"{part}: damaged cache part ({type(exc).__name__}); delete it to rescore"
                ) from None
            for row in table:
                embedding = None if row["embedding"] is None else np.asarray(row["embedding"], dtype=np.float32)
                if kind == "texts":
                    self.texts[row["sha256"]] = embedding
                else:
                    self.images[row["sha256"]] = ImageRecord(
                        row["sha256"], embedding, row["jpeg_quality"], row["pixel_std"], row["skip"]
                    )

    def _parts(self) -> list[tuple[str, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(m.group(1), int(m.group(2)), p) for p in self.folder.iterdir() if (m := _PART.match(p.name))]
        return [(kind, path) for kind, _, path in sorted(found, key=lambda f: (f[0], f[1], f[2].name))]

    def _next_part(self, kind: str) -> Path:
        numbers = [int(_PART.match(p.name).group(2)) for k, p in self._parts() if k == kind]
        return self.folder / f"{kind}-{max(numbers, default=-1) + 1:06d}{self.suffix}.parquet"

    def _write(self, kind: str, rows: list[dict], schema: pa.Schema) -> None:
        if not (self.folder / "model.json").exists():
            write_json(self.folder / "model.json", {"fingerprint": self.fingerprint, **self.about})
        with atomic_path(self._next_part(kind)) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)

    def add_images(self, records: list[ImageRecord]) -> None:
        """Persist ``records`` as one new part, then remember them."""
        if not records:
            return
        rows = [
            {
                "sha256": r.sha256,
                "embedding": None if r.embedding is None else r.embedding.astype(np.float32).tolist(),
                "jpeg_quality": r.jpeg_quality,
                "pixel_std": r.pixel_std,
                "skip": r.skip,
            }
            for r in records
        ]
        self._write("images", rows, IMAGE_SCHEMA)
        self.images.update((r.sha256, r) for r in records)

    def add_texts(self, texts: dict[str, np.ndarray]) -> None:
        if not texts:
            return
        rows = [{"sha256": key, "embedding": value.astype(np.float32).tolist()} for key, value in texts.items()]
        self._write("texts", rows, TEXT_SCHEMA)
        self.texts.update(texts)

    def compact(self) -> None:
        """Fold each kind's parts into one: the merged part is written before the old ones go."""
        for kind in ("images", "texts"):
            parts = [p for k, p in self._parts() if k == kind]
            if len(parts) < 2:
                continue
            if kind == "images":
                self.add_images(list(self.images.values()))
            else:
                self.add_texts(dict(self.texts))
            for part in parts:
                part.unlink()
