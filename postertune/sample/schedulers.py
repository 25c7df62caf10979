"""Samplers by the names people use in the SD UIs, built from the model's own scheduler config
(the U-Net's, when its folder saves one: prediction type, zero terminal SNR, trailing steps)."""

from __future__ import annotations

from typing import get_args

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from postertune.models.schedule import supports_zero_terminal_snr
from postertune.params import ParamError
from postertune.sample.params import SchedulerName

SCHEDULERS: dict[SchedulerName, tuple[type[SchedulerMixin], dict]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpm++2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}


if set(SCHEDULERS) != set(get_args(SchedulerName)):
    raise AssertionError("sample.params.SchedulerName must list exactly the samplers built here")


def check_sampler(name: str, config: dict, model: str) -> None:
    """A sampler that cannot rescale the betas would sample a zero-terminal-SNR model on the wrong schedule."""
    if config.get("rescale_betas_zero_snr") and not supports_zero_terminal_snr(SCHEDULERS[name][0]):
        usable = ", ".join(n for n, (cls, _) in SCHEDULERS.items() if supports_zero_terminal_snr(cls))
        raise ParamError("sample.scheduler", f"{name} cannot sample {model}, a zero-terminal-SNR model; use {usable}")


def make_scheduler(name: str, config: dict, model: str = "the model") -> SchedulerMixin:
    """The named sampler, keeping the model's noise schedule (betas, prediction type, timestep spacing)."""
    check_sampler(name, config, model)
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
