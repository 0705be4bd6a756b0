"""Build a model from its config and fill it from a checkpoint, with no fp32 detour and no silent gaps.

The model is built on the meta device (no time spent on random init, no memory for it), then the
checkpoint's tensors are assigned in place after a layout check: any missing weight or any wrong
shape is an error that says what the file looks like, never a partially random model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.files.checkpoints import CheckpointError, read_state_dict
from ldm.files.mapped_file import MappedFile
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.models.taesd import load_taesd
from ldm.modules.attention import CrossAttention
from ldm.speed import native
from ldm.speed.fused_epilogues import fuse_epilogues
from ldm.speed.packed_conv import pack_convolutions
from ldm.speed.runtime import Runtime
from ldm.speed.weight_cast import compute_in
from ldm.util import instantiate_from_config

# Keys real SD v1 files carry that the model rightly does not have.
HARMLESS_EXTRA_PREFIXES = ("model_ema.",)
HARMLESS_EXTRA_KEYS = {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
# Keys the model can compute itself when a file lacks them.
OPTIONAL_KEYS = set(SCHEDULE_BUFFERS)
# An LCM-distilled UNet's guidance-embedding projection (UNetModel's time_cond_proj_dim).
GUIDANCE_PROJ_KEY = "model.diffusion_model.time_embedding.cond_proj.weight"
# Byte alignment of fresh CPU allocations (64, one cache line / AVX-512 vector).
ALIGNMENT = 64


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    global_step: int | None = None

    def summary(self) -> str:
        return f"missing keys: {len(self.missing)}, unexpected keys: {len(self.unexpected)}"


def load_config(path: str | os.PathLike) -> DictConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (see configs/ for the shipped ones)")
    return OmegaConf.load(path)


def resolve_config_path(path: str, config_path: str | os.PathLike) -> str:
    """A relative path from a config is tried from the working directory, then from each directory above
    the config file, so `models/demo/x.safetensors` in `configs/demo/x.yaml` works from any directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for parent in Path(config_path).resolve().parents:
        if (parent / path).exists():
            return str(parent / path)
    return path


def describe_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the kind of model a state dict holds, for error messages."""
    unet_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    ctx = sd.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if unet_in is None:
        if any(k.startswith(("encoder.", "decoder.")) for k in sd):
            return "a bare VAE (autoencoder) checkpoint, not a full Stable Diffusion model"
        return "not a Stable Diffusion checkpoint (no UNet weights under model.diffusion_model.)"
    if any(k.startswith("cond_stage_model.model.") for k in sd) or (ctx is not None and ctx.shape[-1] == 1024):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, 1024-dim context)"
    if unet_in.shape[1] == 9:
        return "an inpainting checkpoint (9-channel UNet input; configs/stable-diffusion/v1-inpainting-inference.yaml)"
    return f"a Stable Diffusion checkpoint with a {unet_in.shape[1]}-channel UNet input"


def check_layout(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> LoadReport:
    """Compare keys and shapes; raise CheckpointError on anything that would leave the model wrong."""
    expected = model.state_dict()
    report = LoadReport()
    bad_shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    report.missing = [k for k in expected if k not in sd and k not in OPTIONAL_KEYS]
    report.unexpected = [
        k
        for k in sd
        if k not in expected and k not in HARMLESS_EXTRA_KEYS and not k.startswith(HARMLESS_EXTRA_PREFIXES)
    ]
    if bad_shapes:
        k = bad_shapes[0]
        raise CheckpointError(
            f"checkpoint does not fit this config: {len(bad_shapes)} tensors have other shapes "
            f"(e.g. {k}: file {list(sd[k].shape)}, model {list(expected[k].shape)}); the file looks like "
            f"{describe_layout(sd)}: use a config made for it"
        )
    if report.missing:
        raise CheckpointError(
            f"checkpoint lacks {len(report.missing)} weights this config needs (e.g. {report.missing[0]}); "
            f"the file looks like {describe_layout(sd)}: use a config made for it"
        )
    return report


def with_unet_options_of(model_config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> Mapping[str, Any]:
    """`model_config`, with `time_cond_proj_dim` set from the file where its UNet takes a guidance embedding (an
    LCM-distilled UNet: `time_embedding.cond_proj.weight`) and the config does not say."""
    weight = sd.get(GUIDANCE_PROJ_KEY)
    if weight is None:
        return model_config
    config = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(dict(model_config)), resolve=True))
    unet = OmegaConf.select(config, "params.unet_config")
    if unet is None:
        raise CheckpointError(f"the checkpoint's UNet takes a guidance embedding ({GUIDANCE_PROJ_KEY}) but the "
                              f"config's model has no params.unet_config to set time_cond_proj_dim on")  # fmt: skip
    if unet.get("params") is None:
        unet.params = {}
    if unet.params.get("time_cond_proj_dim") is None:
        unet.params.time_cond_proj_dim = int(weight.shape[1])
    return config


def _restore_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if module is not model and hasattr(module, "restore_buffers"):
            module.restore_buffers(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"model still has {len(left)} uninitialised tensors after loading, e.g. {left[0]}")


def build_model(
    model_config: Mapping[str, Any],
    sd: Mapping[str, torch.Tensor],
    runtime: Runtime,
    release: Callable[[torch.Tensor], object] | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Instantiate `model_config` and fill it from `sd`, cast to the runtime's weight dtype, on its device.

    `release(source)` is called for each file tensor that had to be copied (another dtype or device, or
    unaligned), right after its copy, so a memory-mapped file's pages can be given back as loading goes."""
    with torch.device("meta"):
        model = instantiate_from_config(with_unet_options_of(model_config, sd))
    report = check_layout(model, sd)
    expected = model.state_dict()
    tensors = {}
    for key, ref in expected.items():
        if key not in sd:
            continue
        source = sd[key]
        dtype = runtime.weight_dtype if ref.is_floating_point() and key not in OPTIONAL_KEYS else ref.dtype
        t = source.to(device=runtime.device, dtype=dtype)
        if t.dim() == 4:  # convolution weights: the layout decides the activations' (their copy, made here)
            t = t.contiguous(memory_format=runtime.memory_format)
        if t.device.type == "cpu" and t.data_ptr() % ALIGNMENT:
            # A view into a memory-mapped .safetensors file sits wherever its header put it; CPU kernels take
            # other vector paths on unaligned data and round differently, so the same weights would not give
            # the same image as from a .ckpt. One aligned copy keeps results independent of the file format.
            t = t.clone()
        if release is not None and t.data_ptr() != source.data_ptr():
            release(source)
        tensors[key] = t
    model.load_state_dict(tensors, strict=False, assign=True)
    _restore_buffers(model, runtime.device)
    model.to(runtime.device)
    model.eval().requires_grad_(False)
    if runtime.casts_weights:
        compute_in(model, runtime.compute_dtype)
    if runtime.packs_convolutions:
        pack_convolutions(model, release)
    if runtime.fuses_epilogues:
        fuse_epilogues(model)
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is not None and hasattr(unet, "shares_guidance_prefix"):
        unet.shares_guidance_prefix = runtime.shares_guidance_prefix
    if runtime.native_attention:
        use_native_attention(model)
    if runtime.compile:
        compile_unet(model, runtime)
    return model, report


def use_native_attention(model: nn.Module) -> bool:
    """Route the model's attention through ldm.speed.native's bf16 kernel (PyTorch's for shapes it lacks); if the
    kernel cannot be had here, say why once and keep PyTorch's."""
    kernel = native.kernel()
    if kernel.function is None:
        warnings.warn(
            f"attention stays PyTorch's: ldm.speed.native's bf16 kernel is unavailable ({kernel.why_not})", stacklevel=3
        )
        return False
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.native_attention = True
    return True


def compile_unet(model: nn.Module, runtime: Runtime) -> None:
    """torch.compile the UNet, the one part called at every step; `Module.compile` keeps the state-dict keys.

    Compiling happens at the first call (a minute or more at full size). On a CPU, inductor's freezing folds the
    frozen weights into oneDNN's packed layouts, at the cost of a packed copy of the UNet's weights; the eager
    path now packs and fuses as much by hand, so there compiling measured no faster (docs/performance.md)."""
    if runtime.device.type == "cpu":
        freeze_compiled_weights()
    model.model.diffusion_model.compile(mode=runtime.compile_mode)


def freeze_compiled_weights() -> None:
    """Inductor's freezing: compiled CPU code treats weights as constants and packs them for oneDNN.

    Process-wide: passed as a torch.compile option it is not applied (measured: no packed copy, no gain)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True


def load_model(
    config: DictConfig | Mapping[str, Any], ckpt: str | os.PathLike, runtime: Runtime, verbose: bool = True
) -> nn.Module:
    """Read `ckpt` safely and build `config.model` from it."""
    sd, info = read_state_dict(ckpt)
    if verbose:
        step = info.get("global_step")
        print(f"Loading model from {ckpt}" + (f" (global step {step})" if step is not None else ""))
    weights_file = MappedFile(ckpt)
    model, report = build_model(config["model"], sd, runtime, release=weights_file.release)
    del sd  # the file's mapping goes with the last view into it
    model.weights_file = weights_file  # so weights freed later can give their pages back (generate.free_weights)
    report.global_step = info.get("global_step")
    if verbose:
        print(
            f"Loaded: {report.summary()}" + (f" ({', '.join(report.unexpected[:3])}...)" if report.unexpected else "")
        )
    return model


def attach_tiny_autoencoder(
    model: nn.Module,
    config: DictConfig | Mapping[str, Any],
    runtime: Runtime,
    paths: Sequence[str | os.PathLike] = (),
    config_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Load the tiny autoencoder (`--vae taesd`) from `paths`, or else from the files the config's `taesd:` section
    names (`ckpt`, relative to the config), built with that section's `params`; attach it to `model`. Its 2.4M
    weights are kept in the dtype the runtime computes in (no 16-bit storage to save)."""
    section = config.get("taesd", None) or {}
    params = dict(section.get("params", None) or {})
    if not paths:
        named = section.get("ckpt", None)
        if not named:
            raise ValueError("--vae taesd needs the tiny autoencoder's files: give --taesd PATH")
        named = [named] if isinstance(named, str) else list(named)
        paths = [resolve_config_path(str(p), config_path) if config_path else str(p) for p in named]
    model.tiny_autoencoder = load_taesd(paths, **params).to(runtime.device, runtime.arithmetic_dtype)
    return model
