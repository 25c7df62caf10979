"""Stage evaluate: score every sampled image, summarise per model, compare the candidate."""

from __future__ import annotations

from postertune.cli import run_stage
from postertune.evaluate.params import EvaluateParams
from postertune.evaluate.run import evaluate
from postertune.metrics import write_metrics
from postertune.params import section


def main() -> None:
    report = evaluate(section(EvaluateParams, "evaluate"))
    write_metrics("evaluate", report.metrics)
    print(report.summary.to_string(index=False))


if __name__ == "__main__":
    run_stage("evaluate", main)
