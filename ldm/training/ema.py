"""Exponential moving average of a module's parameters, in the original `LitEma` checkpoint layout."""

from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA weights kept as buffers named after each parameter with the dots removed
    (`model_ema.diffusion_modelout2weight`), plus `decay` and `num_updates`: the layout of the original
    checkpoints, which `scripts/convert_ckpt.py --use-ema` reads back.

    The decay warms up as min(decay, (1 + n) / (10 + n)), so early averages do not drag in the random init.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))
        self.names = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                short = name.replace(".", "")
                self.names[name] = short
                self.register_buffer(short, p.detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(float(self.decay), (1.0 + n) / (10.0 + n))
        params = dict(model.named_parameters())
        for name, short in self.names.items():
            shadow = getattr(self, short)
            shadow.lerp_(params[name].detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, short in self.names.items():
            params[name].copy_(getattr(self, short))
