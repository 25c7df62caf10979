"""The lora stage: LoRAs extracted from the fine-tune, and LoRA files merged into a U-Net.

Writes, under ``lora.output`` (atomically, as one folder):

- ``rank-<r>.safetensors`` per ``lora.extract_ranks``: kohya/A1111 layout, loadable by
  diffusers' ``load_lora_weights``, ComfyUI and AUTOMATIC1111;
- with ``lora.merge``: ``merged/unet/`` (diffusers U-Net folder) and ``merged.safetensors``
  (single-file checkpoint with the base's VAE and text encoders), the files merged into the
  fine-tuned or the base U-Net.

Every merge file is checked against the U-Net before anything is extracted or written.
"""

from __future__ import annotations

from pathlib import Path

from postertune.atomic import atomic_dir
from postertune.lora.extract import extract, lora_metadata, lora_tensors, save_lora
from postertune.lora.params import LoraParams
from postertune.memory import resident_peak_mb
from postertune.models.loading import POINTER_FILE, load_pipeline, read_pointer, save_unet
from postertune.models.lora import LoraFile, merge_loras, read_lora, unet_layers
from postertune.models.single_file import save_single_file
from postertune.models.weights import FolderWeights, open_unet_weights
from postertune.params import ParamError

MERGED_UNET = "merged/unet"
MERGED_FILE = "merged.safetensors"


def lora_file_name(rank: int) -> str:
    return f"rank-{rank}.safetensors"


def run(params: LoraParams) -> dict:
    check_inputs(params)
    if not params.enabled:
        with atomic_dir(params.output):
            pass
        print(f"lora: disabled; {params.output} left empty")
        return {"enabled": 0}
    merges = read_merges(params)  # every merge file checked before anything is written
    device = params.torch_device
    with atomic_dir(params.output) as tmp:
        metrics = extract_all(params, tmp, device)
        if merges:
            metrics["merged_layers"] = merge_into_unet(params, merges, tmp)
    metrics["peak_memory_mb"] = round(resident_peak_mb(), 1)
    return metrics


def check_inputs(params: LoraParams) -> None:
    if not (params.unet / "config.json").is_file():
        raise ParamError("lora.unet", f"{params.unet} is not a diffusers U-Net folder (no config.json)")
    if not params.base.is_dir():
        raise ParamError("lora.base", f"{params.base} does not exist")
    for i, item in enumerate(params.merge):
        if not item.path.is_file():
            raise ParamError(f"lora.merge[{i}].path", f"{item.path} does not exist")


def read_merges(params: LoraParams) -> list[tuple[LoraFile, float]]:
    if not params.merge:
        return []
    weights = FolderWeights(params.unet)
    try:
        config = weights.config
    finally:
        weights.close()
    layers = unet_layers(config)
    return [(read_lora(item.path, layers, config), item.weight) for item in params.merge]


def base_model_name(base: Path) -> str:
    """What the base is, for the LoRA's metadata: a pointer's source, else the folder."""
    pointer = base / POINTER_FILE
    return read_pointer(pointer).base if pointer.is_file() else str(base)


def extract_all(params: LoraParams, out: Path, device: str) -> dict:
    if not params.extract_ranks:  # merge only
        return {"enabled": 1, "layers": 0, "skipped_layers": 0, "extract_seconds": 0.0, "ranks": {}}
    base, tuned = open_unet_weights(params.base), FolderWeights(params.unet)
    try:
        extraction = extract(
            base, tuned, params.extract_ranks, params.conv_rank, params.skip_threshold, device, params.svd
        )
    finally:
        base.close()
        tuned.close()
    name = base_model_name(params.base)
    ranks = {}
    for rank in params.extract_ranks:
        path = out / lora_file_name(rank)
        save_lora(
            path,
            lora_tensors(extraction, rank, params.save_precision),
            lora_metadata(extraction, rank, name, str(params.unet)),
        )
        ranks[str(rank)] = {
            "relative_error": round(extraction.relative_error(rank), 6),
            "relative_error_linear": round(extraction.relative_error(rank, ("linear", "conv1x1")), 6),
            "relative_error_conv3x3": round(extraction.relative_error(rank, ("conv3x3",)), 6),
            "file_bytes": path.stat().st_size,
        }
        print(
            f"lora: rank {rank}: relative error {ranks[str(rank)]['relative_error']:.4f}, "
            f"{path.stat().st_size / 1e6:.2f} MB -> {params.output / path.name}"
        )
    return {
        "enabled": 1,
        "layers": len(extraction.layers),
        "skipped_layers": len(extraction.skipped),
        "extract_seconds": round(extraction.seconds, 2),
        "ranks": ranks,
    }


def merge_into_unet(params: LoraParams, merges: list[tuple[LoraFile, float]], out: Path) -> int:
    """Merge into the fine-tuned or base U-Net; write the diffusers folder and the single file."""
    unet_dir = params.unet if params.merge_into == "finetuned" else None
    pipe = load_pipeline(params.base, unet_dir)
    changed = merge_loras(pipe.unet, merges)
    save_unet(pipe.unet, out / MERGED_UNET, params.save_precision, pipe.scheduler)
    save_single_file(
        out / MERGED_FILE, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, params.save_precision
    )
    files = ", ".join(f"{lora.path}@{weight:g}" for lora, weight in merges)
    print(f"lora: merged {files} into the {params.merge_into} U-Net ({changed} layers) -> {params.output}/merged*")
    return changed
