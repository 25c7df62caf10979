"""The sample stage's work from params to images, manifest and grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from postertune.launch import launched_processes
from postertune.sample.models import check_models, fingerprints
from postertune.sample.params import SampleParams
from postertune.sample.prompts import check_preset_names, load_presets, load_prompts, select_prompts
from postertune.sample.render import (
    RenderResult,
    multi_chunk_prompts,
    plan_jobs,
    render_jobs,
    truncation_warnings,
    write_grids,
)


@dataclass(frozen=True)
class SampleReport:
    images: int
    result: RenderResult
    grids: list[Path]
    warnings: list[str]
    multi_chunk_prompts: int  # distinct prompts and negative prompts past one 75-token chunk


def run(params: SampleParams) -> dict | None:
    """Render what is missing, redraw the grids, print what happened; return the stage metrics
    (None in a process other than the main one)."""
    report = sample(params)
    if report is None:
        return None
    for warning in report.warnings:
        print(f"sample: warning: {warning}")
    result = report.result
    print(f"sample: {result.rendered} rendered, {result.reused} reused, {len(report.grids)} grids in {params.output}")
    return {
        "images": report.images,
        "multi_chunk_prompts": report.multi_chunk_prompts,
        "rendered": result.rendered,
        "reused": result.reused,
        "render_seconds": round(result.seconds, 1),
    }


def sample(params: SampleParams) -> SampleReport | None:
    """Check every input first, then render what is missing and redraw the grids (launched as
    several processes: each renders its share, the main process writes the rest)."""
    check_models(params.models, params.scheduler)
    presets = load_presets(params.negative_presets)
    check_preset_names(params.negative, presets, "param sample.negative")
    prompts = select_prompts(load_prompts(params.prompts, presets), params.prompt_ids, "param sample.prompt_ids")

    jobs = plan_jobs(params, fingerprints(params.models), prompts, presets)
    warnings = truncation_warnings(jobs, params.max_token_length)
    result = render_jobs(jobs, params, launched_processes())
    if result is None:
        return None
    return SampleReport(len(jobs), result, write_grids(jobs, params), warnings, multi_chunk_prompts(jobs))
