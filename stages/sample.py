"""Stage sample: render every prompt with every model, same seeds, and a grid per prompt."""

from __future__ import annotations

from postertune.cli import run_stage
from postertune.metrics import write_metrics
from postertune.params import section
from postertune.sample.params import SampleParams
from postertune.sample.run import sample


def main() -> None:
    params = section(SampleParams, "sample")
    report = sample(params)
    for warning in report.warnings:
        print(f"sample: warning: {warning}")
    result = report.result
    print(f"sample: {result.rendered} rendered, {result.reused} reused, {len(report.grids)} grids in {params.output}")
    write_metrics(
        "sample",
        {
            "images": report.images,
            "rendered": result.rendered,
            "reused": result.reused,
            "render_seconds": round(result.seconds, 1),
        },
    )


if __name__ == "__main__":
    run_stage("sample", main)
