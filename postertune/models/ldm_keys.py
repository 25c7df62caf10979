"""Key names of the original (Stability/LDM) SDXL checkpoint, derived from diffusers configs.

Diffusers names modules by block (``down_blocks.1.resnets.0``); the original layout
numbers them as flat sequences (``input_blocks.4.0``). Both follow from the same
structure, so the mapping is generated from the config (number of levels, resnets per
level, which levels have attention) rather than listed by hand: it holds for the real
SDXL U-Net and VAE and for the tiny ones alike.

Each ``*_prefix_map`` returns ``{diffusers module prefix: original module prefix}``;
``rename`` applies it to one state-dict key by its longest matching module prefix.
``unet_blocks`` numbers the U-Net's blocks in the original layout, as kohya-ss's ``block_lr`` does.
"""

from __future__ import annotations

from collections.abc import Mapping

# kohya-ss's UNET_NUM_BLOCKS_FOR_BLOCK_LR: the SDXL U-Net's blocks (the tiny U-Net has the same layout)
SDXL_UNET_BLOCKS = 23
UNET_SECTIONS = ("embeddings", "input_blocks", "middle_block", "output_blocks", "out")

# diffusers ResnetBlock2D sub-module → original ResBlock sub-module
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers VAE mid-block attention → original AttnBlock (q, k, v, proj_out are 1×1 convs there)
VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet(prefix_map: dict[str, str], diffusers: str, original: str, parts: Mapping[str, str]) -> None:
    for diffusers_part, original_part in parts.items():
        prefix_map[f"{diffusers}.{diffusers_part}"] = f"{original}.{original_part}"


def unet_prefix_map(config: Mapping) -> dict[str, str]:
    """Module prefixes of a ``UNet2DConditionModel`` (SDXL-style) → the original U-Net's."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise ValueError("layers_per_block must be one number for the original layout")
    down_attention = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]

    m = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    if config.get("addition_embed_type") == "text_time":
        m["add_embedding.linear_1"] = "label_emb.0.0"
        m["add_embedding.linear_2"] = "label_emb.0.2"

    # input_blocks: conv_in, then per level `per_level` × [resnet, attention?], then a downsampler
    index = 1
    for level in range(levels):
        for layer in range(per_level):
            _resnet(m, f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{index}.0", UNET_RESNET_PARTS)
            if down_attention[level]:
                m[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    _resnet(m, "mid_block.resnets.0", "middle_block.0", UNET_RESNET_PARTS)
    m["mid_block.attentions.0"] = "middle_block.1"
    _resnet(m, "mid_block.resnets.1", "middle_block.2", UNET_RESNET_PARTS)

    # output_blocks: per level `per_level + 1` × [resnet, attention?, upsampler on the last]
    index = 0
    for level in range(levels):
        for layer in range(per_level + 1):
            _resnet(m, f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{index}.0", UNET_RESNET_PARTS)
            if up_attention[level]:
                m[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == per_level and level < levels - 1:
                slot = 2 if up_attention[level] else 1
                m[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return m


def unet_block(original_key: str) -> str:
    """The block an original-layout U-Net key belongs to: ``embeddings`` (``time_embed``, ``label_emb``),
    ``input_blocks.N``, ``middle_block.N``, ``output_blocks.N`` or ``out``."""
    head, index = (original_key.split(".") + [""])[:2]
    if head in ("time_embed", "label_emb"):
        return "embeddings"
    return "out" if head == "out" else f"{head}.{index}"


def unet_blocks(config: Mapping) -> list[str]:
    """Every block of the U-Net in kohya-ss's ``block_lr`` order: embeddings, input blocks, middle
    block parts, output blocks, out (23 for SDXL)."""

    def order(block: str) -> tuple[int, int]:
        section, _, index = block.partition(".")
        return UNET_SECTIONS.index(section), int(index or 0)

    return sorted({unet_block(original) for original in unet_prefix_map(config).values()}, key=order)


def vae_prefix_map(config: Mapping) -> dict[str, str]:
    """Module prefixes of an ``AutoencoderKL`` → the original LDM autoencoder's."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    m = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = f"{part}.conv_in"
        m[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        m[f"{part}.conv_out"] = f"{part}.conv_out"
        for i in range(2):
            _resnet(m, f"{part}.mid_block.resnets.{i}", f"{part}.mid.block_{i + 1}", VAE_RESNET_PARTS)
        for diffusers_part, original_part in VAE_ATTENTION_PARTS.items():
            m[f"{part}.mid_block.attentions.0.{diffusers_part}"] = f"{part}.mid.attn_1.{original_part}"

    for level in range(levels):
        for layer in range(per_level):
            _resnet(
                m,
                f"encoder.down_blocks.{level}.resnets.{layer}",
                f"encoder.down.{level}.block.{layer}",
                VAE_RESNET_PARTS,
            )
        if level < levels - 1:
            m[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"

    # The original decoder numbers its levels from the lowest resolution up: reversed.
    for level in range(levels):
        original = levels - 1 - level
        for layer in range(per_level + 1):
            _resnet(
                m,
                f"decoder.up_blocks.{level}.resnets.{layer}",
                f"decoder.up.{original}.block.{layer}",
                VAE_RESNET_PARTS,
            )
        if level < levels - 1:
            m[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{original}.upsample.conv"
    return m


def open_clip_prefix_map(num_layers: int) -> dict[str, str]:
    """Module prefixes of a transformers CLIP text model (without ``text_model.``) → OpenCLIP's.

    The attention's q, k and v projections are fused in OpenCLIP (``attn.in_proj_*``) and
    the text projection is a transposed matrix; ``single_file`` handles those two.
    """
    m = {
        "embeddings.token_embedding": "token_embedding",
        "final_layer_norm": "ln_final",
    }
    for n in range(num_layers):
        d, o = f"encoder.layers.{n}", f"transformer.resblocks.{n}"
        m[f"{d}.self_attn.out_proj"] = f"{o}.attn.out_proj"
        m[f"{d}.layer_norm1"] = f"{o}.ln_1"
        m[f"{d}.layer_norm2"] = f"{o}.ln_2"
        m[f"{d}.mlp.fc1"] = f"{o}.mlp.c_fc"
        m[f"{d}.mlp.fc2"] = f"{o}.mlp.c_proj"
    return m


def rename(key: str, prefix_map: Mapping[str, str]) -> str:
    """Rename ``key`` by the longest module prefix of it found in ``prefix_map``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefix_map:
            return ".".join([prefix_map[prefix], *parts[cut:]])
    raise ValueError(f"no original-layout name for {key!r}: unsupported architecture")
