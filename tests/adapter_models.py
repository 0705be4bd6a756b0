"""Models and random adapter files for the LoRA / textual-inversion tests: ours and diffusers' on the same weights.

The diffusers side is built with the key mapping and configs of tests/test_parity_diffusers.py (checked there
against diffusers' own converter), the text encoder is transformers' CLIPTextModel, as a diffusers pipeline
loads it. LoRA files are written from one model's own module list (ours for the LDM naming, diffusers' for its
naming), so neither side's name mapping is used to make them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from omegaconf import OmegaConf
from torch import nn

from ldm.adapters.naming import unet_layout
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config

from . import test_parity_diffusers as par
from .conftest import CPU_CONFIG, TINY_CONFIG

CONFIGS = {"tiny": TINY_CONFIG, "full": CPU_CONFIG}


class Parts(nn.Module):
    """The two parts of a LatentDiffusion that adapters touch, under the same attribute paths."""

    def __init__(self, unet: nn.Module, embedder: FrozenCLIPEmbedder) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = embedder


class Loader(StableDiffusionLoraLoaderMixin):
    """diffusers' pipeline LoRA loading (load_lora_weights, fuse_lora) on a bare UNet and text encoder."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.hf_device_map = None  # what a pipeline on one device holds; the mixin asks
        self.components = {"unet": unet, "text_encoder": text_encoder}


def _random_(module: nn.Module, seed: int) -> None:
    """Parameters filled in place: weights ~ N(0, 1/fan_in), norm scales 1 + 0.1 N, other 1-D 0.1 N.

    Each tensor is a slice, at its own random offset, of one pool of 2^22 normal draws: drawing the full-size
    model's billion values one by one would take half a minute; copying from a pool is a memory copy."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=g)
    pool = torch.cat([pool, pool])  # any slice up to the pool's length is contiguous
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                scale, shift = 0.1, (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                scale, shift = (0.02 if "embedding" in name else p[0].numel() ** -0.5), 0.0
            flat = p.view(-1)
            for start in range(0, flat.numel(), 1 << 22):
                n = min(1 << 22, flat.numel() - start)
                offset = int(torch.randint(0, 1 << 22, (), generator=g))
                torch.mul(pool[offset : offset + n], scale, out=flat[start : start + n])
            if shift:
                p.add_(shift)


def build_ours(which: str, seed: int = 0, dtype: torch.dtype = torch.float32, text_only: bool = False) -> Parts:
    model = OmegaConf.load(CONFIGS[which]).model.params
    with torch.device("meta"):
        unet = nn.Identity() if text_only else instantiate_from_config(model.unet_config)
        embedder = instantiate_from_config(model.cond_stage_config)
    parts = Parts(unet, embedder).to_empty(device="cpu")
    embedder.restore_buffers(torch.device("cpu"))
    embedder.transformer.text_model.embeddings.position_ids = torch.arange(
        embedder.transformer.text_model.config.max_position_embeddings
    )[None]
    _random_(parts, seed)
    if dtype != torch.float32:
        parts.to(dtype)
    return parts.eval().requires_grad_(False)


def unet_cfg(unet: nn.Module) -> dict[str, Any]:
    mult, blocks, attn = unet_layout(unet)
    heads = unet.input_blocks[1][1].transformer_blocks[0].attn1.heads
    return dict(model_channels=unet.model_channels, channel_mult=mult, num_res_blocks=blocks,
                attention_resolutions=attn, num_heads=heads, transformer_depth=1)  # fmt: skip


def build_their_text(ours: Parts) -> nn.Module:
    text = ours.cond_stage_model.transformer.text_model
    config = transformers.CLIPTextConfig(**dataclasses.asdict(text.config))
    config._attn_implementation = "eager"
    with torch.device("meta"):
        their_text = transformers.CLIPTextModel(config)
    their_text.load_state_dict(text.state_dict(), strict=True, assign=True)
    for name, buf in list(their_text.named_buffers()):
        if buf.is_meta:  # position_ids, non-persistent: arange as transformers makes it
            owner, _, attr = name.rpartition(".")
            setattr(their_text.get_submodule(owner), attr, torch.arange(buf.shape[-1])[None])
    return their_text.eval().requires_grad_(False)


def build_theirs(ours: Parts) -> tuple[UNet2DConditionModel, nn.Module]:
    """diffusers' UNet and transformers' text model on our weight tensors themselves (no copy: the full-size model
    is 4 GB). diffusers' fuse_lora adds into those tensors in place, so merge ours before fusing theirs, and
    compare bit for bit only on models of their own."""
    unet = ours.model.diffusion_model
    cfg = unet_cfg(unet)
    context = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{**par.diffusers_unet_config(cfg), "cross_attention_dim": context})
    theirs.load_state_dict(par.unet_to_diffusers(unet, cfg), strict=True, assign=True)
    return theirs.eval().requires_grad_(False), build_their_text(ours)


# ----------------------------------------------------------------------------- random LoRA files


def lora_targets(model: nn.Module, kinds: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    """Layers a LoRA of these kinds trains: 'attn' (transformer Linears and proj_in/out), 'conv' (ResBlock convs,
    3x3 and 1x1, and their time projection), 'text' (the CLIP layers)."""
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        in_transformer = "transformer_blocks" in path or path.endswith(("proj_in", "proj_out"))
        in_resnet = any(s in path for s in ("in_layers", "out_layers", "emb_layers", "skip_connection", "resnets"))
        if ("attn" in kinds and in_transformer) or ("conv" in kinds and in_resnet) or "text" in kinds:
            yield path, m


def lora_factors(module: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    if w.ndim == 4:
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.5 / rank**0.5
    else:
        down = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        up = torch.randn(w.shape[0], rank, generator=g) * 0.5 / rank**0.5
    return up, down


def make_lora(fmt: str, unet: nn.Module, text: nn.Module, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A random LoRA over `unet` (ours for fmt 'kohya_ldm', diffusers' otherwise) and `text` (a CLIP text model:
    the module paths start at its `text_model`).

    kohya_ldm / kohya_diffusers: lora_unet_/lora_te_ keys, dots as underscores, lora_down/lora_up/alpha;
    peft: unet./text_encoder. keys with lora_A/lora_B and no alpha (diffusers takes alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = [("unet", unet, ("attn", "conv")), ("text", text, ("text",))]
    for part, model, kinds in parts:
        for path, m in lora_targets(model, kinds):
            up, down = lora_factors(m, rank, g)
            name = path if part == "unet" else f"text_model.{path}"
            if fmt == "peft":
                stem = ("unet." if part == "unet" else "text_encoder.") + name
                sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
            else:
                stem = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
                sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
                sd[f"{stem}.alpha"] = torch.tensor(float(rank) * (0.5 + torch.rand((), generator=g).item()))
    return sd


def fold_alpha(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA with alpha / rank multiplied into lora_up and alpha set to the rank (scale 1).

    diffusers 0.42 with PEFT 0.21 drops kohya alphas it cannot match to modules ('alpha_pattern keys did not
    match'), so its side gets the update's closed form, scale folded in; the names still go through its converter."""
    out = dict(sd)
    for key, alpha in sd.items():
        if key.endswith(".alpha"):
            stem = key[: -len(".alpha")]
            rank = sd[f"{stem}.lora_down.weight"].shape[0]
            out[f"{stem}.lora_up.weight"] = sd[f"{stem}.lora_up.weight"] * (float(alpha) / rank)
            out[key] = torch.tensor(float(rank))
    return out


def converter_module_names(unet: nn.Module) -> dict[str, str]:
    """Our UNet's module paths -> diffusers', as diffusers' own single-file converter renames their weights
    (matched by tensor identity), independent of the mapping in ldm.adapters.naming."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    config = par.diffusers_unet_config(unet_cfg(unet))
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    theirs_by_ptr = {v.data_ptr(): k for k, v in converted.items() if k.endswith(".weight")}
    names = {}
    for path, m in unet.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            names[path] = theirs_by_ptr[m.weight.data_ptr()].removesuffix(".weight")
    return names


def rename_kohya_unet(sd: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A kohya file in LDM naming rewritten in diffusers' naming (`names` from converter_module_names)."""
    flat = {ours.replace(".", "_"): theirs.replace(".", "_") for ours, theirs in names.items()}
    out = {}
    for key, value in sd.items():
        if key.startswith("lora_unet_"):
            stem, _, suffix = key.removeprefix("lora_unet_").partition(".")
            key = f"lora_unet_{flat[stem]}.{suffix}"
        out[key] = value
    return out


def build_our_text_only(which: str, seed: int = 0) -> Parts:
    """Only the text encoder of `which` (the UNet an empty stand-in): for textual-inversion tests."""
    return build_ours(which, seed, text_only=True)
