"""Exponential moving average of the U-Net weights, kept on the accelerator or in host memory.

diffusers' ``EMAModel`` does the averaging. Its shadow weights stay float32 even when
the U-Net trains in bf16 (small EMA steps vanish in bf16). With ``ema_device: cpu``
the U-Net's weights are copied to host memory for each update, which trades time for
accelerator memory.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel


class UNetEMA:
    def __init__(self, unet: UNet2DConditionModel, decay: float, device: torch.device):
        self.device = device
        shadow = [p.detach().to(device, torch.float32) for p in unet.parameters()]
        self.model = EMAModel(shadow, decay=decay, model_cls=UNet2DConditionModel, model_config=unet.config)

    def update(self, parameters: list[torch.nn.Parameter]) -> None:
        if parameters and parameters[0].device != self.device:
            # EMAModel averages only parameters that require grad; host copies must say they do.
            parameters = [torch.nn.Parameter(p.detach().to(self.device)) for p in parameters]
        self.model.step(parameters)

    def move_to(self, parameters: list[torch.nn.Parameter]) -> None:
        """Copy the averages into ``parameters`` and free them: the run is over."""
        self.model.copy_to(parameters)
        self.model.shadow_params = []
