"""LoRA files for the SDXL U-Net: their two key layouts, checks, and merging into a U-Net.

A LoRA adds ``scale · up @ down`` to a Linear or Conv weight (``down``: rank × fan-in, with the
conv kernel; ``up``: fan-out × rank, 1×1 for convs). Two layouts of the same numbers:

- **kohya / AUTOMATIC1111 / ComfyUI**: ``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank), where ``<module>`` is the
  module's name in the original (Stability) U-Net with ``.`` written as ``_``
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
- **diffusers / PEFT**: ``[unet.]<diffusers module>.lora_A.weight`` and ``.lora_B.weight``
  (older diffusers files: ``.lora.down.weight`` / ``.lora.up.weight``); alpha from the file's
  ``lora_adapter_metadata`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
  ``use_rslora``) or ``<module>.alpha`` keys, else alpha = rank (scale 1), diffusers' convention.

``read_lora`` checks a whole file against the U-Net it is meant for (every key known, every
shape fitting, the architecture SDXL) and fails with one line naming the file and the first
bad key, so callers check every file before they write anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError, safe_open

from postertune.errors import PipelineError
from postertune.models.ldm_keys import rename, unet_prefix_map

KOHYA_PREFIX = "lora_unet_"
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
PEFT_METADATA_KEY = "lora_adapter_metadata"
# ModelSpec and kohya-ss metadata that name the model a LoRA was made for
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
SDXL_BASE_VERSION = "sdxl_base_v1-0"
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder(_2)?\.|te\d?\.|lora_te_)")
# kohya-ss names SD 1.x/2.x LoRAs after the diffusers U-Net (it trains those on it); SDXL after the original
_SD1_NAMING = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
_PEFT_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}


def adaptable_layers(unet: UNet2DConditionModel) -> dict[str, tuple[int, ...]]:
    """Every Linear and Conv2d of ``unet``: ``{diffusers module name: weight shape}``."""
    return {
        name: tuple(module.weight.shape)
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def unet_layers(config: Mapping) -> dict[str, tuple[int, ...]]:
    """``adaptable_layers`` of the U-Net a config describes, built without allocating weights."""
    with torch.device("meta"):
        return adaptable_layers(UNet2DConditionModel.from_config(dict(config)))


def kohya_name(module: str, config: Mapping) -> str:
    """``down_blocks.1.attentions.0.proj_in`` → ``lora_unet_input_blocks_4_1_proj_in``."""
    return kohya_names([module], config)[module]


def kohya_names(modules: Iterable[str], config: Mapping) -> dict[str, str]:
    prefix_map = unet_prefix_map(config)
    return {
        m: KOHYA_PREFIX + rename(f"{m}.weight", prefix_map).removesuffix(".weight").replace(".", "_") for m in modules
    }


def kernel_kind(shape: tuple[int, ...]) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` (any conv with a kernel wider than 1)."""
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if shape[2:] == (1, 1) else "conv3x3"


@dataclass
class LoraLayer:
    down: torch.Tensor  # rank × fan-in (× kernel)
    up: torch.Tensor  # fan-out × rank (× 1 × 1)
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale · up @ down`` as a weight of ``shape``."""
        up = self.up.flatten(1).to(dtype)
        down = self.down.flatten(1).to(dtype)
        return (up @ down).reshape(shape) * self.scale


@dataclass
class LoraFile:
    path: Path
    layers: dict[str, LoraLayer]  # by diffusers module name
    layout: str  # kohya | peft
    metadata: dict[str, str]


def _bad(path: Path | str, problem: str) -> PipelineError:
    return PipelineError(f"LoRA {path}: {problem}")


def read_lora(path: Path | str, layers: Mapping[str, tuple[int, ...]], config: Mapping) -> LoraFile:
    """The LoRA at ``path``, checked against the U-Net with these ``layers`` and ``config``."""
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        raise _bad(path, f"not a safetensors file ({text[0] if text else type(exc).__name__})") from None
    if not tensors:
        raise _bad(path, "holds no tensors")
    _check_architecture(path, metadata, sorted(tensors))

    kohya = kohya_names(layers, config)
    by_kohya = {name: module for module, name in kohya.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layouts = set()
    for key in sorted(tensors):
        module, part, layout = _parse_key(path, key, by_kohya, layers)
        parts.setdefault(module, {})[part] = tensors[key]
        layouts.add(layout)

    alphas = _peft_alphas(path, metadata) if "peft" in layouts else None
    result = {}
    for module, got in parts.items():
        key = kohya[module] if "kohya" in layouts and module in kohya else module
        for needed in ("down", "up"):
            if needed not in got:
                raise _bad(path, f"key {key}: has no {needed} weight")
        down, up = got["down"], got["up"]
        _check_shapes(path, key, down, up, layers[module])
        rank = down.shape[0]
        if "alpha" in got:
            alpha = float(got["alpha"].float().item())
            scale = alpha / rank
        elif alphas is not None:
            scale = alphas(module, rank)
        else:
            scale = 1.0
        result[module] = LoraLayer(down=down, up=up, scale=scale)
    return LoraFile(path=path, layers=result, layout="+".join(sorted(layouts)), metadata=metadata)


def _check_architecture(path: Path, metadata: dict[str, str], keys: list[str]) -> None:
    arch = metadata.get("modelspec.architecture")
    if arch and not arch.startswith("stable-diffusion-xl"):
        raise _bad(path, f"made for another architecture ({arch}, per its metadata; first key {keys[0]}), not SDXL")
    version = metadata.get("ss_base_model_version")
    if version and not version.startswith("sdxl"):
        raise _bad(path, f"made for another architecture ({version}, per its metadata; first key {keys[0]}), not SDXL")
    if all(_TEXT_ENCODER.match(k) for k in keys):
        raise _bad(path, f"a text-encoder-only LoRA (first key {keys[0]}); only U-Net LoRAs are merged")


def _parse_key(
    path: Path, key: str, by_kohya: Mapping[str, str], layers: Mapping[str, tuple[int, ...]]
) -> tuple[str, str, str]:
    """``(diffusers module, down|up|alpha, layout)`` of one key, or the one-line error."""
    if _TEXT_ENCODER.match(key):
        raise _bad(path, f"key {key}: a text-encoder key; only the U-Net is merged")
    if key.startswith(KOHYA_PREFIX):
        name, _, part = key.partition(".")
        kind = {DOWN: "down", UP: "up", ALPHA: "alpha"}.get(part)
        if kind is None:
            raise _bad(path, f"key {key}: unknown key (expected lora_down.weight, lora_up.weight or alpha)")
        if name not in by_kohya:
            if _SD1_NAMING.match(name):
                raise _bad(path, f"key {key}: a LoRA for another architecture (SD 1.x/2.x naming), not SDXL")
            raise _bad(path, f"key {key}: unknown key (no such layer in this SDXL U-Net)")
        return by_kohya[name], kind, "kohya"
    for suffix, kind in _PEFT_PARTS.items():
        if key.endswith(suffix):
            module = key.removesuffix(suffix).removeprefix("unet.")
            module = module.replace(".processor.", ".")
            if module not in layers:
                raise _bad(path, f"key {key}: unknown key (no such layer in this SDXL U-Net)")
            return module, kind, "peft"
    raise _bad(path, f"key {key}: unknown key (neither the kohya nor the diffusers/PEFT LoRA layout)")


def _check_shapes(path: Path, key: str, down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> None:
    fan_in = math.prod(shape[1:])
    fits = (
        down.ndim == up.ndim == len(shape)
        or (len(shape) == 4 and shape[2:] == (1, 1) and down.ndim == up.ndim == 2)  # 1×1 conv as a matrix
    )
    rank = down.shape[0] if down.ndim else 0
    fits = (
        fits
        and down.ndim >= 2
        and up.ndim >= 2
        and math.prod(down.shape[1:]) == fan_in
        and up.shape[:2] == (shape[0], rank)
        and math.prod(up.shape[2:]) == 1
        and (down.ndim == 2 or tuple(down.shape[2:]) == shape[2:])
    )
    if not fits:
        raise _bad(
            path,
            f"key {key}: shapes down {tuple(down.shape)} and up {tuple(up.shape)} do not fit the layer's weight {shape}",
        )


def _peft_alphas(path: Path, metadata: dict[str, str]):
    """``alpha_scale(module, rank)`` from a diffusers file's adapter metadata (scale 1 without it)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return lambda module, rank: 1.0
    try:
        data = json.loads(raw)
    except ValueError:
        raise _bad(path, f"metadata {PEFT_METADATA_KEY} is not valid JSON") from None
    config = {k.removeprefix("unet."): v for k, v in data.items() if not k.startswith("text_encoder")}
    alpha = config.get("lora_alpha")
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def scale(module: str, rank: int) -> float:
        value = alpha if alpha is not None else rank
        for pattern, pattern_alpha in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                value = pattern_alpha
                break
        return value / (math.sqrt(rank) if rslora else rank)

    return scale


def check_loras(items: Iterable[tuple[Path | str, float]], unet: UNet2DConditionModel) -> list[tuple[LoraFile, float]]:
    """Read and check every ``(path, weight)`` against ``unet`` before any is merged."""
    layers = adaptable_layers(unet)
    return [(read_lora(path, layers, unet.config), weight) for path, weight in items]


@torch.no_grad()
def merge_loras(unet: UNet2DConditionModel, loras: Iterable[tuple[LoraFile, float]]) -> int:
    """Add ``weight · scale · up @ down`` of each file to ``unet``'s weights, in place; the count of
    layers changed. Deltas are computed in float32 and added in the weight's own dtype."""
    modules = dict(unet.named_modules())
    changed = set()
    for lora, weight in loras:
        for name, layer in lora.layers.items():
            target = modules[name].weight
            delta = layer.delta(tuple(target.shape)).to(target.device) * weight
            target.copy_((target.float() + delta).to(target.dtype))
            changed.add(name)
    return len(changed)
