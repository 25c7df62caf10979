"""``lora:`` params: extract LoRAs from the fine-tune, merge LoRA files into a U-Net."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from postertune.devices import check_device, resolve_device
from postertune.params import Bounds, Invalid, Precision


@dataclass(frozen=True)
class MergeItem:
    """One LoRA file (kohya or diffusers/PEFT layout) and the weight it is merged with."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class LoraParams:
    enabled: bool = True  # false: the stage writes an empty output folder and no LoRA
    base: Path = Path("models/base")  # the saved base (full folder or base.json pointer)
    unet: Path = Path("models/unet")  # the fine-tuned U-Net folder
    # one file per rank, rank-<r>.safetensors; each Linear and 1×1 conv gets this rank ([]: merge only)
    extract_ranks: list[Annotated[int, Bounds(ge=1)]] = field(default_factory=lambda: [4, 16])
    # rank of the 3×3 convs (kohya-ss conv_dim); 0 leaves them out
    conv_rank: Annotated[int, Bounds(ge=0)] = 8
    # a layer whose delta's Frobenius norm is at most this fraction of its weight's is left out
    skip_threshold: Annotated[float, Bounds(ge=0)] = 1.0e-6
    # full: LAPACK's exact SVD; randomized: a randomized SVD of rank + 8 columns (far faster at full
    # SDXL size for ranks well below a layer's width; the error reported stays exact)
    svd: Literal["full", "randomized"] = "full"
    save_precision: Precision = "float"
    device: str = "auto"  # where the SVDs run: auto (a GPU when present), cpu, cuda, cuda:N
    merge: list[MergeItem] = field(default_factory=list)  # [] : nothing is merged
    merge_into: Literal["finetuned", "base"] = "finetuned"
    output: Path = Path("models/lora")

    def __post_init__(self) -> None:
        if len(set(self.extract_ranks)) != len(self.extract_ranks):
            raise Invalid("extract_ranks", f"{self.extract_ranks} names a rank twice")
        seen = set()
        for i, item in enumerate(self.merge):
            if item.path.suffix != ".safetensors":
                raise Invalid(f"merge[{i}].path", f"{item.path} is not a .safetensors file")
            if item.path in seen:
                raise Invalid(f"merge[{i}].path", f"{item.path} is listed twice")
            seen.add(item.path)
        check_device("lora.device", self.device)

    @property
    def torch_device(self) -> str:
        return resolve_device("lora.device", self.device)
