"""Entry-point wrapper shared by the stage modules: one clear line on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable

from postertune.errors import PipelineError


def run_stage(name: str, main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
