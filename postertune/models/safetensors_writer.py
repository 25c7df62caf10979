"""Write ``.safetensors`` files one tensor at a time.

``safetensors.torch.save_file`` turns every tensor into bytes before it writes the first
one, so saving a model that way holds a second full copy of it (6.5 GB for the SDXL single
file in fp16, on top of the model). The format is simple to write as a stream: 8 bytes
(little-endian) giving the header's length, the JSON header (``__metadata__``, then per
tensor its dtype, shape and byte range), padded with spaces to a multiple of 8, then each
tensor's raw little-endian bytes in header order. Here each tensor is produced (cast to
the save precision, made contiguous, moved off the device) only when its turn comes and
dropped once written.

The file is byte-for-byte what ``save_file`` writes, except that the metadata keys are
in sorted order (``save_file`` writes them in hash-map order, which changes from process
to process): tensors take the order safetensors itself gives them, read from a header it
writes for empty stand-ins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as serialize

from postertune.models.precision import Precision, torch_dtype

HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class Pending:
    """A tensor to be written: its shape and dtype now, its values when the writer reaches it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def pending(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Pending:
    """``tensor`` as it will be written: detached, on the CPU, contiguous, in ``dtype`` (default: its own)."""
    dtype = dtype or tensor.dtype
    return Pending(tuple(tensor.shape), dtype, lambda: tensor.detach().to("cpu", dtype).contiguous())


def cast_when_written(state_dict: Mapping[str, torch.Tensor], precision: Precision) -> dict[str, Pending]:
    """A state dict as a checkpoint in ``precision`` holds it: floating-point tensors cast, each
    only when its turn comes; the model is untouched."""
    dtype = torch_dtype(precision)
    return {key: pending(t, dtype if t.is_floating_point() else None) for key, t in state_dict.items()}


def write_safetensors(path: Path | str, tensors: Mapping[str, Pending], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` holding at most one of them in memory at a time."""
    names, dtype_names = _layout(tensors)
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in names:
        entry = tensors[name]
        size = _numel(entry.shape) * entry.dtype.itemsize
        header[name] = {"dtype": dtype_names[name], "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            f.write(_raw_bytes(name, tensors[name]))


def _layout(tensors: Mapping[str, Pending]) -> tuple[list[str], dict[str, str]]:
    """The order safetensors writes ``tensors`` in, and its name for each one's dtype."""
    stand_ins = {name: torch.empty(0, dtype=entry.dtype) for name, entry in tensors.items()}
    data = serialize(stand_ins)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    names = list(header)  # the header lists tensors in the order of their data
    return names, {name: header[name]["dtype"] for name in names}


def _raw_bytes(name: str, entry: Pending) -> memoryview:
    tensor = entry.produce()
    if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
        raise ValueError(
            f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, announced {entry.shape} {entry.dtype}"
        )
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count
