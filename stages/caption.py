"""Caption stage: one short caption, one long caption and a tag list per kept image."""

from __future__ import annotations

from postertune.caption.params import CaptionParams
from postertune.caption.runner import run_caption
from postertune.cli import run_stage
from postertune.metrics import write_metrics
from postertune.params import section


def main() -> None:
    params = section(CaptionParams, "caption")
    report = run_caption(params)
    write_metrics("caption", report.metrics)
    m = report.metrics
    ran = ", ".join(f"{name} {count}" for name, count in report.computed.items()) or "none"
    print(f"caption: {m['captioned']}/{m['images']} images captioned; model runs this time: {ran}")


if __name__ == "__main__":
    run_stage("caption", main)
