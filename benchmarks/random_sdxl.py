"""An SDXL base folder with random weights, at the real or the tiny configs, written one tensor at a time.

    python benchmarks/random_sdxl.py /tmp/sdxl-random --size sdxl    # 6.9 GB of fp16 files, nothing downloaded

The folder is what ``StableDiffusionXLPipeline.from_pretrained`` and the train stage read
from a hub snapshot: ``model_index.json``, the U-Net, VAE and both text encoders (configs
and fp16 safetensors, sharded as diffusers and transformers shard them, with an index), the
real CLIP tokenizers (built offline, ``postertune.models.tokenizer``) and the Euler scheduler.

Nothing is built whole: the models exist only on the meta device (shapes, no storage), and
each tensor is drawn when the writer reaches it and dropped once written, so building the
2,567,463,684-parameter U-Net takes the memory of its largest tensor. Weights follow
PyTorch's default initialisation (uniform within 1/sqrt(fan_in) for Linear and Conv
weights and biases, ones and zeros for norms, N(0, 0.02) for embeddings, as CLIP's), drawn
from a generator seeded by the seed and the tensor's name: the same seed writes the same
files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from postertune.atomic import atomic_dir  # noqa: E402
from postertune.models.safetensors_writer import Pending, write_safetensors  # noqa: E402
from postertune.models.sdxl_configs import CLIP_VIT_L, OPEN_CLIP_BIG_G, SDXL_UNET, SDXL_VAE  # noqa: E402
from postertune.models.tiny import (  # noqa: E402
    SDXL_SCHEDULER_CONFIG,
    TEXT_WIDTH,
    TEXT_WIDTH_2,
    tiny_text_config,
    tiny_unet_config,
    tiny_vae_config,
)
from postertune.models.tokenizer import clip_tokenizer  # noqa: E402

DTYPE = torch.float16
# Shards at most this large: the real U-Net spans three files; the tiny one two, so that the
# tiny build exercises the same sharded loading.
MAX_SHARD_BYTES = {"sdxl": 2 * 10**9, "tiny": 4 * 10**6}
# What the tiny text configs set besides the widths: CLIP's special tokens and 77 positions.
TEXT_TOKENS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# Shard and index names as diffusers (U-Net, VAE) and transformers (text encoders) write them.
WEIGHT_FILES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def sdxl_on_meta(size: str) -> dict[str, torch.nn.Module]:
    """The four weighted components at ``size`` ("sdxl" or "tiny"), without storage."""
    if size == "sdxl":
        unet, vae = SDXL_UNET, SDXL_VAE
        text = CLIPTextConfig(**CLIP_VIT_L, **TEXT_TOKENS, hidden_act="quick_gelu", projection_dim=768)
        text_2 = CLIPTextConfig(**OPEN_CLIP_BIG_G, **TEXT_TOKENS, hidden_act="gelu")
    else:
        unet, vae = tiny_unet_config(), tiny_vae_config()
        text, text_2 = tiny_text_config("quick_gelu", TEXT_WIDTH), tiny_text_config("gelu", TEXT_WIDTH_2)
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**unet),
            "vae": AutoencoderKL(**vae),
            "text_encoder": CLIPTextModel(text),
            "text_encoder_2": CLIPTextModelWithProjection(text_2),
        }


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, Pending]:
    """Every tensor of ``model``'s state dict, to be drawn in fp16 when written."""
    return {name: _drawn(model, name, tuple(t.shape), seed) for name, t in model.state_dict().items()}


def _drawn(model: torch.nn.Module, name: str, shape: tuple[int, ...], seed: int) -> Pending:
    owner_name, _, kind = name.rpartition(".")
    owner = model.get_submodule(owner_name)

    def draw() -> torch.Tensor:
        out = torch.empty(shape, dtype=DTYPE)
        if isinstance(owner, torch.nn.GroupNorm | torch.nn.LayerNorm):
            return out.fill_(1.0 if kind == "weight" else 0.0)
        generator = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        if isinstance(owner, torch.nn.Embedding):
            return out.normal_(0.0, 0.02, generator=generator)
        weight = owner.weight  # Linear or Conv2d: the bound of both its weight and bias
        bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
        return out.uniform_(-bound, bound, generator=generator)

    return Pending(shape, DTYPE, draw)


@dataclass(frozen=True)
class Shard:
    file: str
    names: list[str]


def shards(weights: dict[str, Pending], library: str, max_bytes: int) -> list[Shard]:
    """The files ``weights`` go into: one when it fits ``max_bytes``, else numbered shards."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, entry in weights.items():
        nbytes = math.prod(entry.shape) * entry.dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    stem = WEIGHT_FILES[library]
    if len(groups) == 1:
        return [Shard(f"{stem}.safetensors", groups[0])]
    return [Shard(f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def write_component(folder: Path, model: torch.nn.Module, library: str, seed: int, max_shard_bytes: int) -> int:
    """Config and random fp16 weights of one component; returns the bytes of weights written."""
    folder.mkdir(parents=True)
    if library == "diffusers":
        model.save_config(folder)
    else:
        model.config.save_pretrained(folder)
    weights = random_weights(model, seed)
    files = shards(weights, library, max_shard_bytes)
    for shard in files:
        write_safetensors(folder / shard.file, {name: weights[name] for name in shard.names}, {"format": "pt"})
    total = sum(math.prod(w.shape) * w.dtype.itemsize for w in weights.values())
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: shard.file for shard in files for name in shard.names},
        }
        (folder / f"{WEIGHT_FILES[library]}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def build_base(folder: Path, size: str, seed: int = 0) -> dict[str, int]:
    """Write the base folder (atomically); returns the parameters of each component."""
    models = sdxl_on_meta(size)
    tokenizer, tokenizer_2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    with atomic_dir(folder) as tmp:
        # model_index.json: what from_pretrained reads to know each component's class
        StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, **models
        ).save_config(tmp)
        for name, model in models.items():
            library = "diffusers" if name in ("unet", "vae") else "transformers"
            write_component(tmp / name, model, library, seed, MAX_SHARD_BYTES[size])
        tokenizer.save_pretrained(tmp / "tokenizer")
        tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        scheduler.save_pretrained(tmp / "scheduler")
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = build_base(args.folder, args.size, args.seed)
    print(json.dumps({"folder": str(args.folder), "parameters": counts}, indent=2))


if __name__ == "__main__":
    main()
