"""The UNet's elementwise work done inside the matrix products before it, for bf16 inference on oneDNN CPUs.

With guidance at 512 pixels, several full passes over memory follow a product in every block: GEGLU's gelu and
gating on [2, 4096, 2560], the bias `addmm` copies into its output, residual adds, the timestep embedding's
add. oneDNN applies each as a post-op on the float32 accumulator while it is in cache, and rounds to bf16
once instead of after every step. So the result differs from the unfused bf16 in the last bits and is at
least as close to float32 (tests/test_fused_epilogues.py); the UNet step is 0.87x as long (docs/performance.md).
Float32 runs are not touched: they keep the original's bits.

`fuse_epilogues` swaps the classes of the UNet's blocks for the subclasses below. Weights, checkpoint keys and
state dicts stay as they were. Each fused forward falls back to its parent's under autograd, and where its
products are not oneDNN's. `ldm.speed.runtime.Runtime.fuses_epilogues` decides when.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import GEGLU, BasicTransformerBlock, SpatialTransformer, repeat_to_batch
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.speed.packed_conv import PackedConv2d
from ldm.speed.token_merge import Merge

_mkldnn = torch.ops.mkldnn


def _fusable(linear: nn.Linear) -> bool:
    w = linear.weight
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and not w.is_mkldnn


def linear_add(linear: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + linear(x)`, the add done on the product's accumulator."""
    return _mkldnn._linear_pointwise.binary(x, residual, linear.weight, linear.bias, "add")


class FusedGEGLU(GEGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not _fusable(self.proj):
            return super().forward(x)
        w, b = self.proj.weight, self.proj.bias
        n = w.shape[0] // 2  # value rows, then gate rows (row blocks of a contiguous weight: no copy)
        gate = _mkldnn._linear_pointwise(x, w[n:], b[n:], "gelu", [], "none")  # erf gelu, as F.gelu
        return _mkldnn._linear_pointwise.binary(x, gate, w[:n], b[:n], "mul")


class FusedTransformerBlock(BasicTransformerBlock):
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, merge: Merge | None = None) -> torch.Tensor:
        out1, out2, ff_out = self.attn1.to_out[0], self.attn2.to_out[0], self.ff.net[2]
        if torch.is_grad_enabled() or not all(_fusable(m) for m in (out1, out2, ff_out)):
            return super().forward(x, context, merge)
        h = self.norm1(x)
        if merge is None:
            x = linear_add(out1, self.attn1.attend(h), x)
        else:  # the projection's output is unmerged before the add
            x = x + merge.unmerge(self.attn1(merge.merge(h)))
        x = x if context is None else repeat_to_batch(x, context.shape[0])
        x = linear_add(out2, self.attn2.attend(self.norm2(x), context), x)
        return linear_add(ff_out, self.ff.net[0](self.norm3(x)), x)


class FusedSpatialTransformer(SpatialTransformer):
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or not isinstance(self.proj_out, PackedConv2d):
            return super().forward(x, context)
        y = self.transform(x, context)
        return self.proj_out.fused(y, add=repeat_to_batch(x, y.shape[0]))


class FusedResBlock(ResBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        conv1, conv2 = self.in_layers[2], self.out_layers[3]
        if torch.is_grad_enabled() or not (isinstance(conv1, PackedConv2d) and isinstance(conv2, PackedConv2d)):
            return super().forward(x, emb)
        h = F.silu(self.in_layers[0](x), inplace=True)  # the norm's fresh output
        e = self.emb_layers(emb).type(h.dtype)
        if torch.equal(e, e[:1].expand_as(e)):
            # One timestep for the whole batch (always so under guidance): the embedding is a per-channel
            # constant, so it joins the convolution's bias.
            h = conv1.fused(h, bias=conv1.bias + e[0])
        else:
            h = conv1(h) + e[:, :, None, None]
        h = F.silu(self.out_layers[0](h), inplace=True)
        return conv2.fused(h, add=self.skip_connection(x))


_FUSED = {
    GEGLU: FusedGEGLU,
    BasicTransformerBlock: FusedTransformerBlock,
    SpatialTransformer: FusedSpatialTransformer,
    ResBlock: FusedResBlock,
}


def fuse_epilogues(model: nn.Module) -> int:
    """Give `model`'s UNet blocks their fused forwards; returns how many. Weights are not touched."""
    if not hasattr(_mkldnn, "_linear_pointwise"):
        return 0
    return _swap_classes(model, _FUSED)


def unfuse_epilogues(model: nn.Module) -> int:
    """Undo `fuse_epilogues`; returns how many."""
    return _swap_classes(model, {fused: cls for cls, fused in _FUSED.items()})


def _swap_classes(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> int:
    swapped = [m for m in model.modules() if type(m) in classes]
    for module in swapped:
        module.__class__ = classes[type(module)]
    return len(swapped)
