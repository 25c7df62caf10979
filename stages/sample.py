"""Stage sample: render every prompt with every model, same seeds, and a grid per prompt."""

from __future__ import annotations

from postertune.cli import run_stage
from postertune.metrics import write_metrics
from postertune.params import section
from postertune.sample.models import check_models, fingerprint
from postertune.sample.params import SampleParams
from postertune.sample.prompts import check_preset_names, load_presets, load_prompts, select_prompts
from postertune.sample.render import plan_jobs, render_jobs, truncation_warnings, write_grids


def main() -> None:
    params = section(SampleParams, "sample")
    check_models(params.models)
    presets = load_presets(params.negative_presets)
    check_preset_names(params.negative, presets, "param sample.negative")
    prompts = select_prompts(load_prompts(params.prompts, presets), params.prompt_ids, "param sample.prompt_ids")

    hashes = {model.name: fingerprint(model) for model in params.models}
    jobs = plan_jobs(params, hashes, prompts, presets)
    for warning in truncation_warnings(jobs):
        print(f"sample: warning: {warning}")
    result = render_jobs(jobs, params)
    grids = write_grids(jobs, params)
    print(f"sample: {result.rendered} rendered, {result.reused} reused, {len(grids)} grids in {params.output}")
    write_metrics(
        "sample",
        {
            "images": len(jobs),
            "rendered": result.rendered,
            "reused": result.reused,
            "seconds_per_image": result.seconds / result.rendered if result.rendered else 0.0,
        },
    )


if __name__ == "__main__":
    run_stage("sample", main)
