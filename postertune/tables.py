"""Reading the image tables one stage hands the next, with one-line errors naming the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from postertune.errors import PipelineError


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
