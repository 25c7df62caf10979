"""Optimizers and learning-rate schedules by name, and Adafactor fused into the backward pass.

Prodigy (``prodigyopt``) estimates its own step size; ``learning_rate`` scales that estimate.

With ``fused_backward_pass`` each parameter is updated by Adafactor the moment its
gradient is complete and the gradient is freed at once, so the full set of U-Net
gradients never sits in memory together (kohya-ss's trick for training the SDXL U-Net
in about 10 GB).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from diffusers.optimization import get_scheduler
from prodigyopt import Prodigy
from transformers.optimization import Adafactor, AdafactorSchedule

from postertune.params import ParamError

if TYPE_CHECKING:
    from postertune.train.params import TrainParams


class FusedAdafactor(Adafactor):
    """Adafactor that can also step a single parameter (``step_param``) with exactly its usual math."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        # Positions, not group objects: accelerate's prepare and load_state replace the groups
        # (keeping their order), and the lr scheduler writes to the live ones.
        self.group_position = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}

    def step_param(self, param: torch.nn.Parameter) -> None:
        group = self.param_groups[self.group_position[param]]
        # Adafactor.step walks self.param_groups: show it a group holding only this parameter.
        all_groups = self.param_groups
        self.param_groups = [{**group, "params": [param]}]
        try:
            self.step()
        finally:
            self.param_groups = all_groups


def optimizer_class(name: str, fused_backward_pass: bool = False) -> type[torch.optim.Optimizer]:
    if name == "AdamW":
        return torch.optim.AdamW
    if name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit
    if name == "Prodigy":
        return Prodigy
    return FusedAdafactor if fused_backward_pass else Adafactor


def make_optimizer(params: TrainParams, parameters: Iterable[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
    """``parameters``: weights, or parameter groups (``groups.param_groups``) whose ``lr`` overrides the default."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in params.optimizer_args.items()}
    cls = optimizer_class(params.optimizer, params.fused_backward_pass)
    return cls(parameters, lr=params.learning_rate, **args)


def make_lr_scheduler(params: TrainParams, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if params.lr_scheduler == "adafactor":
        return AdafactorSchedule(optimizer)
    return get_scheduler(
        params.lr_scheduler,
        optimizer,
        num_warmup_steps=params.lr_warmup_steps,
        num_training_steps=params.max_train_steps,
        **params.lr_scheduler_args,
    )


def fuse_into_backward(optimizer: FusedAdafactor) -> list:
    """Step each of the optimizer's parameters as soon as backward has accumulated its gradient,
    then free that gradient."""

    def step_and_free(param: torch.nn.Parameter) -> None:
        optimizer.step_param(param)
        param.grad = None

    return [p.register_post_accumulate_grad_hook(step_and_free) for p in optimizer.group_position]


def release_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Free the optimizer's per-weight state and the gradients once no step follows (before saving)."""
    optimizer.state.clear()
    for param in parameters:
        param.grad = None


def check_optimizer_args(params: TrainParams) -> None:
    """Build the optimizer and schedule on a stand-in weight, so bad names and values fail before
    any model loads."""
    if params.optimizer == "AdamW8bit":
        return  # bitsandbytes checks its arguments on the device it runs on
    accepted = inspect.signature(optimizer_class(params.optimizer).__init__).parameters
    foreign = [key for key in params.optimizer_args if key not in accepted or key in ("self", "params", "lr")]
    if foreign:
        # typically a profile's args for another optimizer, after -S train.optimizer=...
        kept = {k: v for k, v in params.optimizer_args.items() if k not in foreign}
        raise ParamError(
            f"train.optimizer_args.{foreign[0]}",
            f"not an argument of {params.optimizer} (drop {', '.join(foreign)}: "
            f"-S 'train.optimizer_args={_hydra_dict(kept)}')",
        )
    # Whatever a constructor raises on this stand-in weight, the args alone are to blame.
    try:
        optimizer = make_optimizer(params, [torch.nn.Parameter(torch.zeros(2, 2))])
    except Exception as exc:
        raise ParamError("train.optimizer_args", f"{params.optimizer} rejects them: {exc}") from None
    try:
        make_lr_scheduler(params, optimizer)
    except Exception as exc:
        raise ParamError("train.lr_scheduler_args", f"{params.lr_scheduler} rejects them: {exc}") from None


def _hydra_dict(values: dict) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in values.items()) + "}"
