"""Rehearse the sdxl profile end to end at the real SDXL size on a CPU, offline, and predict its GPU memory.

    python benchmarks/rehearse_fullsize.py                # full size: a whole 24 GB machine for about half an hour
    python benchmarks/rehearse_fullsize.py --size tiny    # the same flow with tiny configs, a few minutes

1. Builds a local SDXL base folder at the real configs with random weights
   (``random_sdxl.py``: U-Net 2,567,463,684 parameters, VAE, CLIP ViT-L and OpenCLIP bigG,
   tokenizers, scheduler; fp16, sharded, one tensor at a time), or reuses the one in
   ``--work`` from an earlier run.
2. Copies the project into a throw-away git + DVC repository (as the end-to-end tests do)
   and runs the whole pipeline there with ``dvc exp run -S profile=sdxl`` and the
   ``overrides`` below: the base is that folder; sizes and counts shrink (256² buckets, 2
   training steps, 2 sampling steps, one prompt, one LoRA rank); compute is float32
   (``mixed_precision: "no"``: this CPU computes bf16 about 40x slower); the learning rate
   moves fp16 weights in two steps. The sections of the profile that need downloaded
   weights or data (fetch sources, captioners, scorers) keep the demo's values. Everything
   else, the train stage's recipe included (Adafactor fused into the backward pass,
   gradient checkpointing, batch 4, fp16 outputs), is the profile's: the same stages and
   code a GPU user runs. Disk: the base (6.9 GB), the last checkpoint (float32 U-Net and
   optimizer state, about 11 GB), the outputs (12 GB) and DVC's cached copies of them.
3. Reports per stage whether it finished and its seconds (from the moment DVC starts it to
   the next one), the train stage's peak memory per phase (``metrics/train.json``), and
   from those a prediction of the GPU memory at 1024² for batch 1 and 4, under the sdxl
   profile's settings and under ``full_bf16``, with the arithmetic (``predict``).

Writes ``rehearsal.json``, ``rehearsal.md`` and the pipeline's log ``rehearsal.log`` into
``--out`` (default ``benchmarks/results/rehearsal-<size>``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.random_sdxl import build_base  # noqa: E402
from tests.pipeline_repo import PipelineRepo  # noqa: E402

GIB = 2**30
MIB = 2**20
STAGES = ("fetch", "dedupe", "filter", "caption", "curate", "train", "lora", "sample", "evaluate")
PHASES = ("load", "cache", "train", "checkpoint", "save")
# Sections whose sdxl-profile values need downloads (sources, captioners, scorers): the demo's instead.
DEMO_SECTIONS = ("fetch", "caption", "curate", "evaluate")
TARGET_RESOLUTION = 1024
PREDICTED_BATCHES = (1, 4)
ADAFACTOR_TEMPORARIES = 3  # float32 copies of one tensor alive while Adafactor updates it (grad², its estimate, update)
RUNNING = re.compile(r"Running stage '([\w-]+)'")
# Training resolution per size: 256² is 1/16 of the profile's pixels; the tiny flow goes smaller to stay quick.
RESOLUTION = {"sdxl": 256, "tiny": 128}


def overrides(base: Path, resolution: int) -> dict[str, Any]:
    """What the rehearsal changes in the sdxl profile: sizes, counts, float32 compute and the local base."""
    prompt = profile_section("sdxl")["train"]["samples"]["prompts"][0]
    return {
        "train.base": str(base),
        "train.vae": None,  # the folder's own VAE (the profile's fp16-fix VAE is on the hub)
        # buckets from half to twice the resolution, as the profile's 512..2048 around 1024
        "train.resolution": resolution,
        "train.min_bucket_reso": resolution // 2,
        "train.max_bucket_reso": resolution * 2,
        "train.max_train_steps": 2,
        # two steps at the profile's 4e-7 leave every weight the same in the fp16 outputs, and the
        # lora stage would find nothing to extract; memory and time do not depend on the rate
        "train.learning_rate": 1e-4,
        "train.mixed_precision": "no",
        "train.samples.every_n_steps": 2,
        "train.samples.steps": 2,
        "train.samples.prompts": [prompt],
        "lora.extract_ranks": [16],  # the rank the sample stage renders on the base
        "sample.prompt_ids": ["pet_bag"],
        "sample.images_per_prompt": 1,
        "sample.steps": 2,
        "sample.width": resolution,
        "sample.height": resolution,
        "sample.precision": "float",
    }


def profile_section(profile: str) -> dict:
    path = ROOT / ("conf/base.yaml" if profile == "demo" else f"conf/profile/{profile}.yaml")
    return yaml.safe_load(path.read_text())


def demo_values() -> dict[str, Any]:
    """Every key the sdxl profile sets in ``DEMO_SECTIONS``, back at its demo value."""
    demo, sdxl = profile_section("demo"), profile_section("sdxl")
    values = {}
    for section in DEMO_SECTIONS:
        for path in leaf_paths(sdxl.get(section, {}), section):
            value: Any = demo
            for part in path.split("."):
                value = value[part]
            values[path] = value
    return values


def leaf_paths(node: Any, prefix: str) -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    return [path for key, value in node.items() for path in leaf_paths(value, f"{prefix}.{key}")]


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S key=value`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_args(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={hydra_value(value)}")]


def run_pipeline(repo: PipelineRepo, args: list[str], log: Path, timeout_s: float) -> tuple[dict, int]:
    """``dvc exp run`` with ``args``; per stage: finished or not, and seconds from its start to the next."""
    started: dict[str, float] = {}
    begin = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "exp", "run", *args],
            cwd=repo.root,
            env=repo.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            out.write(line)
            match = RUNNING.search(line)
            if match:
                started[match.group(1)] = time.perf_counter()
                print(f"  {time.perf_counter() - begin:7.1f} s  {match.group(1)}", flush=True)
            if time.perf_counter() - begin > timeout_s:
                proc.kill()
        code = proc.wait()
    ended = time.perf_counter()
    order = [name for name in STAGES if name in started]
    stages = {}
    for name in STAGES:
        if name not in started:
            stages[name] = {"finished": False, "seconds": None}
            continue
        later = order.index(name) + 1
        stop = started[order[later]] if later < len(order) else ended
        stages[name] = {"finished": later < len(order) or code == 0, "seconds": round(stop - started[name], 1)}
    return stages, code


# --- the prediction ---------------------------------------------------------------------------


def adafactor_state_values(shapes: list[tuple[int, ...]]) -> int:
    """Values of Adafactor's second-moment state (transformers, no first moment as the profile sets it):
    a tensor of two or more dimensions keeps a row and a column factor, others a full copy."""
    total = 0
    for shape in shapes:
        if len(shape) >= 2:
            total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
        else:
            total += math.prod(shape)
    return total


def model_shapes(base: Path) -> dict[str, list[tuple[int, ...]]]:
    """Parameter shapes of the base folder's U-Net and text encoders, from their configs (meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base / "text_encoder_2"))
    return {
        "unet": [tuple(p.shape) for p in unet.parameters()],
        "text_encoders": [tuple(p.shape) for model in (text, text_2) for p in model.parameters()],
    }


def predict(train_metrics: dict, shapes: dict, batch: int, resolution: int) -> dict:
    """GPU memory at 1024² from the CPU rehearsal: weights, gradient, optimizer state and text encoders
    counted from the shapes; activations measured (the train phase's peak above its start, less the
    optimizer state and one update's temporaries, per image) and scaled by pixels and batch.

    Under the sdxl profile (float32 master weights, bf16 autocast) autocast keeps a bf16 copy of
    every weight until the forward pass ends; with ``full_bf16`` the weights are bf16 themselves.
    The activations were measured in float32: bf16 autocast keeps most of them at half that, so
    that term is an upper bound. Not counted: the CUDA context and allocator reserve (about 0.5 to
    1 GB outside ``max_memory_allocated``).
    """
    unet = shapes["unet"]
    params = sum(math.prod(s) for s in unet)
    if params != train_metrics["trainable_params"]:
        raise AssertionError(
            f"the base's U-Net has {params} parameters, the run trained {train_metrics['trainable_params']}"
        )
    largest = max(math.prod(s) for s in unet)
    state = adafactor_state_values(unet)
    text = sum(math.prod(s) for s in shapes["text_encoders"])
    measured = train_metrics["added_memory_mb_train"] * MIB
    step_overhead = state * 4 + (1 + ADAFACTOR_TEMPORARIES) * largest * 4
    per_image = max(0.0, measured - step_overhead) / batch
    scale = (TARGET_RESOLUTION / resolution) ** 2
    inputs = {
        "unet_params": params,
        "largest_tensor": largest,
        "adafactor_state_values": state,
        "text_encoder_params": text,
        "measured_batch": batch,
        "measured_resolution": resolution,
        "train_added_mb": train_metrics["added_memory_mb_train"],
        "activations_per_image_gib_measured": per_image / GIB,
    }
    lines = [
        f"measured at {resolution}² (batch {batch}, float32): train phase rose {measured / GIB:.3f} GiB above its start;",
        f"  less Adafactor state {state:,} x 4 B and {1 + ADAFACTOR_TEMPORARIES} float32 copies of the largest tensor "
        f"{largest:,} x 4 B = {step_overhead / GIB:.3f} GiB",
        f"  = {per_image / GIB:.3f} GiB of activations per {resolution}² image (gradient checkpointing on)",
        f"  x {scale:g} for {TARGET_RESOLUTION}² (pixels) = {per_image * scale / GIB:.3f} GiB per {TARGET_RESOLUTION}² image",
    ]
    cases = []
    for name, master_bytes, autocast_copy in (
        ("sdxl profile: float32 master weights, bf16 autocast", 4, True),
        ("full_bf16: bf16 weights", 2, False),
    ):
        for predicted_batch in PREDICTED_BATCHES:
            terms = {
                "weights": params * master_bytes,
                "autocast_bf16_copy": params * 2 if autocast_copy else 0,
                "gradient_one_tensor": largest * master_bytes,  # fused_backward_pass
                "adafactor_state": state * 4 + ADAFACTOR_TEMPORARIES * largest * 4,
                "text_encoders_bf16": text * 2,  # captions change every step: the encoders stay on the GPU
                "activations": per_image * scale * predicted_batch,
            }
            total = sum(terms.values())
            cases.append(
                {
                    "name": name,
                    "batch": predicted_batch,
                    "terms_gib": {k: round(v / GIB, 3) for k, v in terms.items()},
                    "total_gib": round(total / GIB, 2),
                }
            )
            lines.append(
                f"{name}, batch {predicted_batch}: "
                f"weights {params:,} x {master_bytes} B = {terms['weights'] / GIB:.2f}"
                + (
                    f" + autocast copy {params:,} x 2 B = {terms['autocast_bf16_copy'] / GIB:.2f}"
                    if autocast_copy
                    else ""
                )
                + f" + gradient {largest:,} x {master_bytes} B = {terms['gradient_one_tensor'] / GIB:.2f}"
                + f" + Adafactor {state:,} x 4 B + {ADAFACTOR_TEMPORARIES} x {largest:,} x 4 B"
                + f" = {terms['adafactor_state'] / GIB:.2f}"
                + f" + text encoders {text:,} x 2 B = {terms['text_encoders_bf16'] / GIB:.2f}"
                + f" + activations {per_image * scale / GIB:.3f} x {predicted_batch} = {terms['activations'] / GIB:.2f}"
                + f" = {total / GIB:.2f} GiB"
            )
    return {"inputs": inputs, "cases": cases, "arithmetic": lines}


# --- the run ------------------------------------------------------------------------------------


def rehearse(size: str, work: Path, timeout_s: float) -> dict:
    base = work / f"base-{size}"
    if base.is_dir():
        print(f"base: reusing {base}")
    else:
        started = time.perf_counter()
        counts = build_base(base, size)
        print(f"base: built {base} in {time.perf_counter() - started:.0f} s: {counts}")
    repo_dir = work / "repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo_dir.mkdir(parents=True)
    repo = PipelineRepo.copy_of_project(repo_dir)
    values = {"profile": "sdxl", **demo_values(), **overrides(base, RESOLUTION[size])}
    args = set_args(values)
    print("dvc exp run " + " ".join(args), flush=True)
    stages, code = run_pipeline(repo, args, work / "rehearsal.log", timeout_s)
    report: dict[str, Any] = {
        "size": size,
        "base": str(base),
        "exit_code": code,
        "overrides": values,
        "stages": stages,
        "all_finished": all(s["finished"] for s in stages.values()),
        "stage_processes_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }
    train_file = repo.root / "metrics/train.json"
    if train_file.is_file():
        train = json.loads(train_file.read_text())
        report["train_memory_mb"] = {
            phase: {"peak": train[f"peak_memory_mb_{phase}"], "added": train[f"added_memory_mb_{phase}"]}
            for phase in PHASES
        }
        params = yaml.safe_load((repo.root / "params.yaml").read_text())["train"]
        report["prediction"] = predict(train, model_shapes(base), params["batch_size"], params["resolution"])
    lora_file = repo.root / "metrics/lora.json"
    if lora_file.is_file():
        report["lora_peak_memory_mb"] = json.loads(lora_file.read_text())["peak_memory_mb"]
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Rehearsal at size `{report['size']}` (exit code {report['exit_code']}); "
        f"peak resident memory of any stage process: {report['stage_processes_peak_rss_mb'] / 1024:.1f} GiB",
        "",
        "| stage | finished | seconds |",
        "|---|---|---:|",
    ]
    for name, stage in report["stages"].items():
        seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.1f}"
        lines.append(f"| {name} | {'yes' if stage['finished'] else 'no'} | {seconds} |")
    if "train_memory_mb" in report:
        lines += ["", "| train phase | peak GiB | above its start, GiB |", "|---|---:|---:|"]
        for phase, memory in report["train_memory_mb"].items():
            lines.append(f"| {phase} | {memory['peak'] / 1024:.2f} | {memory['added'] / 1024:.2f} |")
    if "prediction" in report:
        lines += ["", "| predicted GPU memory at 1024² | batch | GiB |", "|---|---:|---:|"]
        for case in report["prediction"]["cases"]:
            lines.append(f"| {case['name']} | {case['batch']} | {case['total_gib']:.1f} |")
        lines += ["", "```", *report["prediction"]["arithmetic"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument(
        "--work", type=Path, help="base folder and repository copy (default /tmp/postertune-rehearsal-<size>)"
    )
    parser.add_argument("--out", type=Path, help="default benchmarks/results/rehearsal-<size>")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    args = parser.parse_args()
    work = (args.work or Path(f"/tmp/postertune-rehearsal-{args.size}")).resolve()
    out = args.out or ROOT / f"benchmarks/results/rehearsal-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report = rehearse(args.size, work, args.timeout_s)
    (out / "rehearsal.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rehearsal.md").write_text(markdown(report))
    (out / "rehearsal.log").write_text((work / "rehearsal.log").read_text())
    print(markdown(report))
    if not report["all_finished"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
