"""Train a LoRA on a frozen base model: the `lora:` section of a config (rank, alpha, target layers).

The adapter layers are written here rather than taken from PEFT: a LoRA is two small matrices and a forward hook
per layer (output += scale * up(down(input))), and our own modules keep their classes and state-dict keys, so
the base checkpoint loads as is and the export to kohya's format is a rename of our own flat layer names.
PEFT would wrap every target module (new classes, new keys) for the same arithmetic.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.files.checkpoints import read_state_dict
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from ldm.training.diffusion import LatentDiffusionTrainer

DEFAULT_TARGETS = ("attn1", "attn2", "ff", "proj_in", "proj_out")


class LoraLayer(nn.Module):
    """The low-rank pair of one Linear or Conv2d: `down` has the layer's input and kernel, `up` is 1x1 (kohya's
    LoCon layout), `up` starts at zero so training starts from the base model exactly."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        w = layer.weight
        self.scale = alpha / rank
        self.down = nn.Parameter(torch.empty(rank, *w.shape[1:]))
        self.up = nn.Parameter(torch.zeros(w.shape[0], rank, *([1] * (w.dim() - 2))))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation) if w.dim() == 4 else None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        return F.conv2d(F.conv2d(x, self.down, **self.conv), self.up) * self.scale

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.update(inputs[0]).to(output.dtype)


def lora_layer_names(unet: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """UNet Linear/Conv2d paths with a dotted part that starts with one of `targets` (e.g. attn1, ff, proj_in)."""
    return [
        path
        for path, m in unet.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and any(part.startswith(targets) for part in path.split("."))
    ]


class LoraTrainer(LatentDiffusionTrainer):
    """Stage 2's trainer with every base weight frozen (read from `base_ckpt`) and LoRA layers on the UNet."""

    def __init__(self, *, base_ckpt: str, lora: dict[str, Any] | None = None, **params: Any) -> None:
        params.update(use_ema=False, cond_stage_trainable=False, first_stage_ckpt=None, zero_unused_tokens=False)
        super().__init__(**params)
        self.load_base(base_ckpt)
        self.requires_grad_(False)
        spec = dict(lora or {})
        rank, alpha = int(spec.get("rank", 4)), float(spec.get("alpha", spec.get("rank", 4)))
        targets = tuple(spec.get("targets", DEFAULT_TARGETS))
        unet = self.model.diffusion_model
        names = lora_layer_names(unet, targets)
        if not names:
            raise ValueError(f"lora.targets {list(targets)} match no layer of the UNet (e.g. attn1, ff, proj_in)")
        # Keys are kohya's layer names, so export is a prefix: lora_layers.<name> -> lora_unet_<name>.
        self.lora_layers = nn.ModuleDict({n.replace(".", "_"): LoraLayer(unet.get_submodule(n), rank, alpha)
                                          for n in names})  # fmt: skip
        for name in names:
            unet.get_submodule(name).register_forward_hook(self.lora_layers[name.replace(".", "_")].hook)

    def load_base(self, path: str | os.PathLike) -> None:
        sd, _ = read_state_dict(path)
        missing, _ = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in SCHEDULE_BUFFERS and not k.startswith("lora_layers.")]
        if missing:
            raise ValueError(f"base_ckpt {path} lacks {len(missing)} weights of this model (e.g. {missing[0]})")

    def configure_optimizers(self) -> dict:
        config = super().configure_optimizers()
        opt = config["optimizer"]
        opt.param_groups[0]["params"] = list(self.lora_layers.parameters())
        return config


def export_kohya(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoraTrainer checkpoint's LoRA tensors under kohya's names (lora_unet_<layer>.lora_down/lora_up/alpha)."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("lora_layers."):
            continue
        name, _, kind = key.removeprefix("lora_layers.").rpartition(".")
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[kind]
        out[f"lora_unet_{name}.{suffix}"] = value.detach().float().contiguous()
    if not out:
        raise ValueError("the checkpoint holds no lora_layers.* tensors: is it from a LoraTrainer run?")
    return out
