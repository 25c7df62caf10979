"""The ``device`` params of the inference stages: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

from __future__ import annotations

import re

from postertune.params import ParamError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check_device(param: str, device: str) -> None:
    """Validate the spelling only; whether the device exists is known when it is resolved."""
    if not _DEVICE.match(device):
        raise ParamError(param, f"{device!r} is not auto, cpu, cuda, cuda:N or mps")


def resolve_device(param: str, device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; a named GPU must exist."""
    import torch  # here, not above: params load without the model libraries

    check_device(param, device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParamError(param, f"{device} requested but torch sees no GPU")
    return device
