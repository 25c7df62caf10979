"""What trains, at which rate: the optimizer's parameter groups.

The U-Net is one group, or with ``block_lr`` one group per block at a multiple of
``learning_rate`` (kohya-ss ``--block_lr``, numbered as ``models.ldm_keys.unet_blocks``: each
diffusers weight is renamed to the original layout by the map the single-file export uses, and
its block is read from that name). A block at multiplier 0 is frozen and left out of the
optimizer, as kohya-ss leaves out blocks at rate 0. Each text encoder that trains
(``train_text_encoder``) is a group at its own rate. Every group carries a ``name``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from postertune.models.ldm_keys import rename, unet_block, unet_blocks, unet_prefix_map
from postertune.models.loading import SDXLComponents
from postertune.models.text_encoders import TEXT_ENCODERS
from postertune.params import ParamError
from postertune.train.params import TrainParams


def unet_block_parameters(unet: UNet2DConditionModel) -> dict[str, list[torch.nn.Parameter]]:
    """The U-Net's weights by block, blocks in kohya-ss's ``block_lr`` order."""
    prefix_map = unet_prefix_map(unet.config)
    blocks: dict[str, list[torch.nn.Parameter]] = {name: [] for name in unet_blocks(unet.config)}
    for key, weight in unet.named_parameters():
        blocks[unet_block(rename(key, prefix_map))].append(weight)
    return blocks


def unfreeze_text_encoders(params: TrainParams, components: SDXLComponents) -> dict[str, torch.nn.Module]:
    """Make the text encoders that train trainable, in the U-Net's dtype; they are returned by name."""
    trained = {}
    for name in params.text_encoder_rates:
        encoder = getattr(components, name)
        encoder.to(dtype=components.unet.dtype).requires_grad_(True).train()
        if params.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
        trained[name] = encoder
    if "text_encoder" in trained:
        # SDXL reads encoder 1's penultimate layer: its last layer and final norm get no gradient
        # (kohya-ss freezes them too; data-parallel training would wait for their gradients)
        encoder = trained["text_encoder"]
        model = getattr(encoder, "text_model", encoder)  # transformers 5 no longer nests it
        model.encoder.layers[-1].requires_grad_(False)
        model.final_layer_norm.requires_grad_(False)
    return trained


def param_groups(
    params: TrainParams, unet: UNet2DConditionModel, text_encoders: dict[str, torch.nn.Module]
) -> list[dict]:
    """The optimizer's groups; a group without ``lr`` takes ``learning_rate``."""
    if params.block_lr is None:
        groups = [{"name": "unet", "params": list(unet.parameters())}]
    else:
        blocks = unet_block_parameters(unet)
        if len(params.block_lr) != len(blocks):
            raise ParamError(
                "train.block_lr",
                f"needs {len(blocks)} multipliers for this U-Net (embeddings, input blocks, middle block, "
                f"output blocks, out), got {len(params.block_lr)}",
            )
        groups = []
        for (block, weights), multiplier in zip(blocks.items(), params.block_lr, strict=True):
            if multiplier == 0:
                for weight in weights:
                    weight.requires_grad_(False)
            else:
                groups.append({"name": f"unet.{block}", "params": weights, "lr": params.learning_rate * multiplier})
    for name, rate in params.text_encoder_rates.items():
        group = {"name": name, "params": [p for p in text_encoders[name].parameters() if p.requires_grad]}
        if rate is not None:
            group["lr"] = rate
        groups.append(group)
    return groups


def logged_rates(params: TrainParams, groups: list[dict], rates: list[float]) -> dict[str, float]:
    """``train/lr``: the scheduled U-Net rate before block multipliers; ``train/lr_<encoder>`` for each
    text encoder that trains. ``rates``: the schedule's current rate of each group."""
    multiplier = next(m for m in params.block_lr if m) if params.block_lr is not None else 1.0
    logged = {"train/lr": rates[0] / multiplier}
    for group, rate in zip(groups, rates, strict=True):
        if group["name"] in TEXT_ENCODERS:
            logged[f"train/lr_{group['name']}"] = rate
    return logged
