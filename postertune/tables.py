"""Reading the image tables one stage hands the next, with one-line errors naming the file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from postertune.errors import PipelineError

ROWS_PER_CHUNK = 10_000


def read_stage_table(path: Path, required: Sequence[str], producer: str) -> pd.DataFrame:
    """Read ``path`` (written by stage ``producer``) and check it has the ``required`` columns."""
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run the {producer} stage first)") from None
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PipelineError(f"{path}: not a readable Parquet table ({type(exc).__name__})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]!r} (run the {producer} stage again)")
    return frame


def iter_records(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """The rows of ``frame`` (only ``columns``, if given) as ``to_dict("records")`` gives them,
    converted a chunk at a time: a million-row table never becomes a million dicts at once."""
    part = frame if columns is None else frame[list(dict.fromkeys(columns))]
    for start in range(0, len(part), ROWS_PER_CHUNK):
        yield from part.iloc[start : start + ROWS_PER_CHUNK].to_dict("records")
