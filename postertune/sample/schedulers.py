"""Samplers by the names people use in the SD UIs, built from the model's own scheduler config."""

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


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """The named sampler, keeping the model's noise schedule (betas, prediction type…)."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
