"""The one table of torch dtypes by the names params use: ``save_precision`` (float, fp16, bf16)
and ``mixed_precision`` (no, fp16, bf16)."""

from __future__ import annotations

import torch

from postertune.params import Precision

DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def torch_dtype(precision: Precision) -> torch.dtype:
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}") from None


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen models compute in under a ``mixed_precision`` setting (``no``: float32)."""
    return torch_dtype("float" if mixed_precision == "no" else mixed_precision)
