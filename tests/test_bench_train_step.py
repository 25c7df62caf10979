"""The training-step benchmark's machinery, on the tiny model and a CPU: every variant is
reported, FLOPs per image are the flop counter's count, and every measured step trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from postertune.models.tiny import POOLED_WIDTH, TEXT_WIDTH, TEXT_WIDTH_2, tiny_unet_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = {  # step, optimizer, weights
    ("diffusers-example", "AdamW", "float32"),
    ("postertune", "Adafactor", "float32"),
    ("postertune", "Adafactor", "bf16"),
    ("postertune", "AdamW", "float32"),
}
BUDGET_S = 15  # the run drops what does not fit and says so; that is part of what is tested


def tiny_flops_per_image(resolution: int) -> int:
    """Forward and backward of one image through the tiny U-Net on real CPU tensors. The math
    attention kernel makes attention visible to the counter as matmuls (it does not count
    PyTorch's fused CPU attention kernel)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config())
    side = resolution // 8
    added = {
        "text_embeds": torch.randn(1, POOLED_WIDTH),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32),
    }
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = unet(
            torch.randn(1, 4, side, side),
            torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 77, TEXT_WIDTH + TEXT_WIDTH_2),
            added_cond_kwargs=added,
        ).sample
        out.square().mean().backward()
    return counter.get_total_flops()


def test_tiny_cpu_run_reports_every_variant(tmp_path, one_torch_thread):
    out = tmp_path / "bench"
    command = [sys.executable, "benchmarks/bench_train_step.py", "--size", "tiny", "--device", "cpu"]
    command += ["--out", str(out), "--threads", "1", "--budget-s", str(BUDGET_S)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((out / "train_step.json").read_text())
    variants = result["variants"]

    def key(v: dict) -> tuple:
        return v["step"], v["optimizer"], v["weights"], v["gradient_checkpointing"], v["torch_compile"], v["batch"]

    expected = {
        (*s, ckpt, comp, b) for s in STEPS for ckpt in (True, False) for comp in (True, False) for b in (1, 4, 8)
    }
    assert sorted(map(key, variants)) == sorted(expected)

    measured = [v for v in variants if v["status"] == "measured"]
    for v in variants:
        assert v["status"] in ("measured", "skipped"), v
        if v["status"] == "skipped":
            assert v["reason"].strip(), v
        if v["torch_compile"]:  # compile is left to a GPU run unless asked for
            assert v["status"] == "skipped" and "cuda" in v["reason"], v
    assert {v["step"] for v in measured} == {"postertune", "diffusers-example"}
    assert all(v["status"] == "measured" for v in variants[:2]), "the first variants always fit the budget"

    baselines = {(v["gradient_checkpointing"], v["batch"]): v for v in measured if v["step"] == "diffusers-example"}
    for v in measured:
        assert v["images_per_s"] > 0 and v["step_s"] > 0
        assert v["weights_changed"] and v["tensors_changed"] > 0, v["name"]
        if v["weights"] == "float32":
            assert v["tensors_changed"] == v["tensors"], v["name"]
        # bf16 weights: an update of about the learning rate (1e-4) cannot move a norm weight of 1.0
        # (bf16 steps by 2**-7 there), so only most tensors change
        assert v["mfu"] is None and v["peak_memory_mb"] is None  # no peak FLOP/s or device memory on a CPU
        base = baselines.get((v["gradient_checkpointing"], v["batch"]))
        if base is not None:
            assert abs(v["vs_diffusers"] - v["images_per_s"] / base["images_per_s"]) < 1e-9

    assert result["flops_per_image"] == tiny_flops_per_image(result["resolution"])
    assert result["targets"]["gpu_figures"] is False
    table = (out / "train_step.md").read_text()
    assert "not GPU figures" in table
    assert table.count("\n| postertune |") + table.count("\n| diffusers-example |") == len(variants)
