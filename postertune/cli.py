"""What every stage module does: read its section of ``params.yaml``, run, write its metrics,
and turn bad input, or an output it cannot write (read-only folder, full disk), into one
clear line (exit status 2) instead of a traceback. Outputs are written atomically, so a
failed write leaves no partial file behind."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from postertune.errors import PipelineError
from postertune.metrics import write_metrics
from postertune.params import section

P = TypeVar("P")


def run_stage(name: str, params_type: type[P], run: Callable[[P], dict | None]) -> None:
    """``run`` the stage ``name`` on its params; its metrics go to ``metrics/<name>.json``
    (a process that returns ``None``, such as a non-main training process, writes none)."""
    try:
        metrics = run(section(params_type, name))
        if metrics is not None:
            write_metrics(name, metrics)
    except PipelineError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"{name}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None
