"""The sample stage's manifest and images, read as untrusted input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from postertune.errors import PipelineError
from postertune.imagesafe import ImageRejected, load_image
from postertune.store import sha256_hex

MANIFEST = "manifest.csv"
NEEDED = ("model", "prompt_id", "prompt", "seed", "path")


def read_samples(folder: Path) -> pd.DataFrame:
    """One row per sampled image; stops on a missing, empty or malformed manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{folder}: no sample images ({MANIFEST} missing)")
    try:
        frame = pd.read_csv(
            path, dtype={"model": str, "prompt_id": str, "prompt": str, "path": str}, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]!r}")
    if frame.empty:
        raise PipelineError(f"{folder}: no sample images ({MANIFEST} lists none)")
    if frame.duplicated(["model", "prompt_id", "seed"]).any():
        row = frame[frame.duplicated(["model", "prompt_id", "seed"])].iloc[0]
        raise PipelineError(f"{path}: image {row['model']}/{row['prompt_id']}/seed {row['seed']} listed twice")
    return frame


def load_sample(folder: Path, relative: str) -> Image.Image:
    path = Path(folder) / relative
    try:
        return load_image(read_sample(folder, relative))
    except ImageRejected as exc:
        raise PipelineError(f"{path}: unreadable image ({exc.reason})") from None


def sample_sha256(folder: Path, relative: str) -> str:
    return sha256_hex(read_sample(folder, relative))


def read_sample(folder: Path, relative: str) -> bytes:
    path = Path(folder) / relative
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise PipelineError(f"{Path(folder) / MANIFEST}: image path {relative!r} leaves {folder}")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: image listed in {MANIFEST} is missing") from None
