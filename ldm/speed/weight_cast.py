"""Layers that store 16-bit weights but compute in float32: half the memory at float32's speed and accuracy
of arithmetic, for CPUs that have no fast 16-bit instructions (`ldm.speed.runtime` decides when).

Each layer's weights are cast when it runs and dropped right after, so only one layer's float32 copy
exists at a time. Modules keep their attribute paths and state-dict keys; only `forward` changes.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Scratch:
    """Reused buffers for the cast weights. Casting into fresh tensors would allocate and free the whole model
    in float32 on every UNet call (3.4 GB for SD v1); allocations that large are fresh pages from the OS each
    time, whose page faults cost seconds per call. Layers run one after another and no op keeps its weight
    once it returns (outside autograd), so one buffer per (slot, dtype, device) serves every layer; a model
    computing through it must therefore not be called from two threads at once."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def cast(self, t: torch.Tensor | None, dtype: torch.dtype, slot: int) -> torch.Tensor | None:
        if t is None or t.dtype == dtype:
            return t
        if torch.is_grad_enabled() and t.requires_grad:
            return t.to(dtype)
        key = (slot, dtype, t.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self.buffers[key] = torch.empty(t.numel(), dtype=dtype, device=t.device)
        flat = buf[: t.numel()]
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            # Keep a channels-last weight channels-last: convolutions take their layout from it.
            n, c, h, w = t.shape
            return flat.view(n, h, w, c).permute(0, 3, 1, 2).copy_(t)
        return flat.view(t.shape).copy_(t)


_SCRATCH = _Scratch()
WEIGHT, BIAS = 0, 1


def _w(m: nn.Module) -> torch.Tensor:
    return _SCRATCH.cast(m.weight, m.compute_dtype, WEIGHT)


def _b(m: nn.Module) -> torch.Tensor | None:
    return _SCRATCH.cast(m.bias, m.compute_dtype, BIAS)


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(m.compute_dtype), _w(m), _b(m))


def _conv(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return m._conv_forward(x.to(m.compute_dtype), _w(m), _b(m))


def _group_norm(m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x.to(m.compute_dtype), m.num_groups, _w(m), _b(m), m.eps)


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.to(m.compute_dtype), m.normalized_shape, _w(m), _b(m), m.eps)


def _embedding(m: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    # Look up, then cast the rows: the same values, without a float32 copy of the whole table.
    return F.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type).to(m.compute_dtype)


_FORWARDS: dict[type[nn.Module], Callable] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _forward_for(module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in _FORWARDS:
            return _FORWARDS[cls]
    return None


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make every layer of `model` compute in `dtype` whatever its weights' dtype; returns `model`.

    Raises TypeError for a module holding its own floating-point weights that this does not know how to
    run, rather than letting it compute in the wrong dtype."""
    for name, module in model.named_modules():
        module.compute_dtype = dtype
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if not own or all(p.dtype == dtype for p in own):
            continue
        forward = _forward_for(module)
        if forward is None:
            what = f"{name or 'the model'} ({type(module).__name__})"
            raise TypeError(f"cannot compute {what} in {dtype} from its weights")
        module.forward = types.MethodType(forward, module)
    return model


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: set by `compute_in`, else its weights' dtype."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None:
        return dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
