"""What a U-Net predicts, on which noise schedule: set for training, kept beside the U-Net for sampling.

SDXL base predicts the noise (``epsilon``) on a schedule whose last step keeps a little of
the image. A fine-tune may predict the velocity instead (``v_prediction``) and rescale the
betas so that the last step is pure noise (``rescale_betas_zero_snr``; Lin et al. 2024,
"Common Diffusion Noise Schedules and Sample Steps are Flawed"); sampling then has to
start at that last step (``timestep_spacing: trailing``). The train stage saves its
inference scheduler's config in the U-Net folder (``scheduler_config.json``), and every
pipeline that loads that U-Net takes the schedule with it (``use_unet_schedule``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from postertune.errors import PipelineError

SCHEDULE_FILE = "scheduler_config.json"  # what SchedulerMixin.save_config writes


def supports_zero_terminal_snr(cls: type[SchedulerMixin]) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def training_scheduler(config: Mapping[str, Any], prediction_type: str, zero_terminal_snr: bool) -> DDPMScheduler:
    """The noise schedule training diffuses latents with: the base's betas, rescaled to zero
    terminal SNR if asked, and what the U-Net is taught to predict."""
    return DDPMScheduler.from_config(config, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)


def inference_scheduler(scheduler: SchedulerMixin, prediction_type: str, zero_terminal_snr: bool) -> SchedulerMixin:
    """``scheduler`` (a pipeline's sampler) set to sample a U-Net trained by ``training_scheduler``."""
    cls = type(scheduler)
    overrides: dict[str, Any] = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        if not supports_zero_terminal_snr(cls):
            raise PipelineError(f"the base's sampler {cls.__name__} cannot sample a zero-terminal-SNR schedule")
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return cls.from_config(scheduler.config, **overrides)


def unet_schedule(unet_dir: Path | str) -> dict[str, Any] | None:
    """The sampler config saved beside a U-Net, if its folder has one."""
    path = Path(unet_dir) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None


def use_unet_schedule(pipe, unet_dir: Path | str) -> None:
    """Give ``pipe`` the schedule its U-Net from ``unet_dir`` was trained for, where one is saved."""
    config = unet_schedule(unet_dir)
    if config is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(config)
