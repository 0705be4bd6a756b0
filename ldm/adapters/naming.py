"""Module names of SD v1's UNet in the original (LDM) layout and in diffusers' layout, and the lookup that takes
a LoRA's target name, in either layout, dotted or kohya's underscored form, to our module.

The block map is the one tests/test_parity_diffusers.py checks against diffusers' own checkpoint converter and
runs both models with; that test and scripts/benchmark.py import it from here, so there is one mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

BlockMap = dict[str, tuple[str, str]]  # our key prefix -> (diffusers key prefix, kind of block)

UNET_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# Spatial transformers (norm, proj_in, transformer_blocks.*, proj_out) already use diffusers' names.
UNET_RENAMES = {"resnet": UNET_RESNET_RENAMES, "transformer": ()}


def unet_block_map(channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int]) -> BlockMap:
    """Prefix of each UNet block in our state dict -> its prefix in diffusers' UNet2DConditionModel."""
    levels = len(channel_mult)
    m: BlockMap = {
        "time_embed.0.": ("time_embedding.linear_1.", "plain"),
        "time_embed.2.": ("time_embedding.linear_2.", "plain"),
        "input_blocks.0.0.": ("conv_in.", "plain"),
        "middle_block.0.": ("mid_block.resnets.0.", "resnet"),
        "middle_block.1.": ("mid_block.attentions.0.", "transformer"),
        "middle_block.2.": ("mid_block.resnets.1.", "resnet"),
        "out.0.": ("conv_norm_out.", "plain"),
        "out.2.": ("conv_out.", "plain"),
    }
    k = 1
    for level in range(levels):
        attn = 2**level in attention_resolutions
        for j in range(num_res_blocks):
            m[f"input_blocks.{k}.0."] = (f"down_blocks.{level}.resnets.{j}.", "resnet")
            if attn:
                m[f"input_blocks.{k}.1."] = (f"down_blocks.{level}.attentions.{j}.", "transformer")
            k += 1
        if level != levels - 1:
            m[f"input_blocks.{k}.0.op."] = (f"down_blocks.{level}.downsamplers.0.conv.", "plain")
            k += 1
    k = 0
    for up in range(levels):  # diffusers' up_blocks run from the lowest resolution up
        level = levels - 1 - up
        attn = 2**level in attention_resolutions
        for j in range(num_res_blocks + 1):
            m[f"output_blocks.{k}.0."] = (f"up_blocks.{up}.resnets.{j}.", "resnet")
            sub = 1
            if attn:
                m[f"output_blocks.{k}.1."] = (f"up_blocks.{up}.attentions.{j}.", "transformer")
                sub = 2
            if level != 0 and j == num_res_blocks:
                m[f"output_blocks.{k}.{sub}.conv."] = (f"up_blocks.{up}.upsamplers.0.conv.", "plain")
            k += 1
    return m


def to_diffusers_name(key: str, block_map: BlockMap, renames: dict[str, Sequence[tuple[str, str]]]) -> str | None:
    """Our state-dict key (or module path with a trailing dot) in diffusers' naming; None outside every block."""
    prefixes = [p for p in block_map if key.startswith(p)]
    if len(prefixes) != 1:
        return None
    ours = prefixes[0]
    theirs, kind = block_map[ours]
    rest = key[len(ours) :]
    for old, new in renames.get(kind, ()):
        if rest.startswith(old):
            rest = new + rest[len(old) :]
            break
    return theirs + rest


def unet_layout(unet: nn.Module) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """(channel_mult, num_res_blocks, attention_resolutions) read off a built UNetModel, which keeps no config.

    Input block 0 is conv_in; each level then has num_res_blocks blocks (a ResBlock, and a transformer where the
    level attends) and, but for the last level, one downsampling block (a single child with an `op` conv)."""
    blocks = list(unet.input_blocks)[1:]
    levels = 1 + sum(1 for b in blocks if hasattr(b[0], "op"))
    per_level = (len(blocks) - (levels - 1)) // levels
    mult, attn = [], []
    for level in range(levels):
        first = blocks[level * (per_level + 1)]
        mult.append(first[0].out_layers[3].out_channels // unet.model_channels)
        if len(first) > 1:
            attn.append(2**level)
    return tuple(mult), per_level, tuple(attn)


def unet_names(unet: nn.Module) -> dict[str, str]:
    """Every name a LoRA may give one of the UNet's Linear/Conv2d layers -> its path in `unet`.

    Both layouts, each dotted (`down_blocks.0.attentions.0.proj_in`) and as kohya writes it (dots as underscores,
    `down_blocks_0_attentions_0_proj_in`); the two layouts' names never coincide (different block names)."""
    block_map = unet_block_map(*unet_layout(unet))
    names: dict[str, str] = {}
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        theirs = to_diffusers_name(path + ".", block_map, UNET_RENAMES)
        for name in (path, None if theirs is None else theirs[:-1]):
            if name:
                names[name] = path
                names[name.replace(".", "_")] = path
    return names


def text_names(text_model: nn.Module) -> dict[str, str]:
    """The text encoder's layers under the names LoRAs give them (transformers' CLIPTextModel layout, which ours
    keeps), dotted and underscored; paths are relative to `text_model` (our `...transformer.text_model`)."""
    names: dict[str, str] = {}
    for path, module in text_model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            for name in (f"text_model.{path}", path):
                names[name] = path
                names[name.replace(".", "_")] = path
    return names
