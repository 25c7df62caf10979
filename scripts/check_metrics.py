#!/usr/bin/env python
"""Check that a reproduced run's metrics equal the committed baseline, within each metric's tolerance.

    dvc repro && python scripts/check_metrics.py [--rev REV]

Compares the metrics in the workspace with those committed at REV (default HEAD) through
``dvc metrics diff --json --all``. Each metric gets the first rule of ``TOLERANCES`` whose file
and metric-name patterns (fnmatch) match it; a metric no rule names must be reproduced exactly.
Prints one line per metric that moved beyond its tolerance and exits 1; exits 0 when none did.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """How far a reproduced value may lie from the committed one: ``max(abs, rel * |committed|)``."""

    rel: float = 0.0
    abs: float = 0.0
    ignored: bool = False

    def allows(self, old: Any, new: Any) -> bool:
        if self.ignored or old == new:
            return True
        if not (is_number(old) and is_number(new)):
            return False
        return math.isclose(new, old, rel_tol=self.rel, abs_tol=self.abs)

    def __str__(self) -> str:
        if self.ignored:
            return "ignored"
        parts = [f"rel {self.rel:g}" if self.rel else "", f"abs {self.abs:g}" if self.abs else ""]
        return ", ".join(p for p in parts if p) or "exact"


EXACT = Tolerance()
IGNORED = Tolerance(ignored=True)

# (metrics file, metric name, tolerance, why): fnmatch patterns; the first matching row wins, and a
# metric no row matches must be reproduced exactly. Nested metrics are named with dots (run.seconds).
# Evidence: two fresh demo runs on one machine agree exactly except in the ignored rows; a run with
# torch limited to AVX2 kernels and one thread (another CPU) moved the float rows by at most: train
# losses and grad norm rel 1e-7; evaluate scores abs 4e-5 (cmmd), skew abs 5e-3, kurtosis abs 2e-2;
# p-values, win rates and every count did not move. Each tolerance is 5x or more what was seen.
TOLERANCES: list[tuple[str, str, Tolerance, str]] = [
    ("*", "*seconds*", IGNORED, "wall-clock time"),
    ("*", "*_s", IGNORED, "wall-clock time"),
    ("*", "*per_s*", IGNORED, "throughput"),
    ("*", "*memory*", IGNORED, "peak memory depends on the allocator and the machine"),
    ("*fetch*", "run.*", IGNORED, "this run's own work: a rerun reuses what persisted shards hold"),
    ("*curate*", "run.*", IGNORED, "this run's own work: a rerun reuses the persisted embedding cache"),
    ("*curate*", "*aesthetic*", Tolerance(abs=2e-4), "float32 scores of a float32 encoder"),
    ("*curate*", "*clip_similarity*", Tolerance(abs=2e-4), "float32 scores of a float32 encoder"),
    ("*curate*", "*_skew", Tolerance(abs=0.1), "shape of 10 near-equal scores amplifies float noise"),
    ("*curate*", "*_kurtosis", Tolerance(abs=0.2), "shape of 10 near-equal scores amplifies float noise"),
    ("*sample*", "rendered", IGNORED, "this run's own work: a rerun reuses persisted renders"),
    ("*sample*", "reused", IGNORED, "this run's own work: a rerun reuses persisted renders"),
    ("*train*", "*loss*", Tolerance(rel=1e-4), "float32 U-Net training; moved rel 1e-7"),
    ("*train*", "*grad_norm*", Tolerance(rel=1e-4), "float32 U-Net training; moved rel 1e-7"),
    ("*lora*", "*relative_error*", Tolerance(rel=1e-3, abs=1e-6), "SVD of float32 deltas; LAPACK differs by CPU"),
    ("*evaluate*", "*_skew", Tolerance(abs=0.1), "shape of 8 near-equal scores amplifies float noise; 5e-3"),
    ("*evaluate*", "*_kurtosis", Tolerance(abs=0.2), "shape of 8 near-equal scores amplifies float noise; 2e-2"),
    ("*evaluate*", "*_p_value", EXACT, "a rank test over the per-prompt differences: discrete"),
    ("*evaluate*", "*_win_rate", EXACT, "a share of the pairs: discrete"),
    ("*evaluate*", "*aesthetic*", Tolerance(abs=2e-4), "float32 scores of float32 renders; moved 1e-6"),
    ("*evaluate*", "*clip_score*", Tolerance(abs=2e-4), "float32 scores of float32 renders; moved 2e-5"),
    ("*evaluate*", "*cmmd*", Tolerance(abs=2e-4), "float32 embeddings of float32 renders; moved 4e-5"),
]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def tolerance(file: str, name: str) -> Tolerance:
    for file_pattern, name_pattern, rule, _ in TOLERANCES:
        if fnmatchcase(file, file_pattern) and fnmatchcase(name, name_pattern):
            return rule
    return EXACT


def problems(diff: dict[str, dict[str, dict[str, Any]]], rev: str = "HEAD") -> list[str]:
    """One line per metric of ``dvc metrics diff --json --all`` output that moved beyond its tolerance.

    Raises ``ValueError`` (one line) when no metric is committed at ``rev`` or none is in the workspace.
    """
    entries = [(file, name, entry) for file, metrics in sorted(diff.items()) for name, entry in sorted(metrics.items())]
    if all(entry.get("old") is None for _, _, entry in entries):
        raise ValueError(f"no committed metrics at {rev} to compare with: commit dvc.lock and the metrics of a run")
    if all(entry.get("new") is None for _, _, entry in entries):
        raise ValueError("no metrics in the workspace: run dvc repro first")
    found = []
    for file, name, entry in entries:
        old, new, rule = entry.get("old"), entry.get("new"), tolerance(file, name)
        if rule.ignored or rule.allows(old, new):
            continue
        if new is None:
            found.append(f"{file}: {name}: committed {old!r}, not reproduced")
        elif old is None:
            found.append(f"{file}: {name}: reproduced {new!r}, not committed at {rev}")
        else:
            found.append(f"{file}: {name}: committed {old!r}, reproduced {new!r} (tolerance: {rule})")
    return found


def metrics_diff(rev: str) -> dict[str, dict[str, dict[str, Any]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "diff", rev, "--json", "--all"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit status {proc.returncode}"]
        raise ValueError(f"dvc metrics diff {rev} failed: {lines[-1].strip()}")
    return json.loads(proc.stdout or "{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision holding the baseline (default: HEAD)")
    args = parser.parse_args(argv)
    try:
        found = problems(metrics_diff(args.rev), args.rev)
    except ValueError as exc:
        print(f"check_metrics: error: {exc}", file=sys.stderr)
        return 1
    for line in found:
        print(line)
    if found:
        print(f"check_metrics: {len(found)} metric(s) differ from {args.rev} beyond their tolerance", file=sys.stderr)
        return 1
    print(f"check_metrics: every metric reproduces {args.rev} within its tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
