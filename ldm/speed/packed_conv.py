"""Convolution weights reordered once, at first use, into the blocked layout oneDNN's CPU kernels read.

An eager `F.conv2d` hands oneDNN a plain weight, which it reorders into its blocked (AMX / AVX-512) layout on
every call. For the UNet's 1280-channel convolutions on 8x8 and 16x16 latents that copy costs more than
the arithmetic: a bf16 3x3 conv on [2, 2560, 8, 8] takes 24.5 ms eagerly and 6.6 ms with the weight
packed once (docs/performance.md). oneDNN runs the same kernel on the same numbers either way, so the
output is bitwise the eager channels-last output (tests/test_packed_conv.py). torch.compile's freezing
does the same packing; this gives it to eager runs, with no compile and no second copy of the weights.

Packing happens at a convolution's first call, for that call's input size, and again when the size changes:
oneDNN picks the layout (and with it the kernel) for the problem, so packing for the size at hand is what
an eager call does; a layout picked for another size ran a 512x512 VAE convolution 10% slower. Sampling
calls each convolution at one size throughout, and tiled decoding uses tiles of one size, so a size change
costs one reorder, once. The packed weight is an opaque oneDNN
tensor with the plain weight's shape and dtype; it replaces the plain one, so the weights are not held twice.
`state_dict()` gives the plain weight back; `Module.to()` and `load_state_dict()` unpack first, so
checkpoints, `free_weights` and peers see an ordinary Conv2d.
Inference only: the packed op has no backward. `ldm.speed.runtime.Runtime.packs_convolutions` decides when.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldm.files.mapped_file import trim_heap


def _mkldnn_ops_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv2d(nn.Conv2d):
    """An `nn.Conv2d` whose weight is packed for oneDNN; made by `pack_convolutions`, not constructed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def fused(self, x: torch.Tensor, bias: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution, with `bias` instead of its own and `add` (shaped as the output) added to the float32
        accumulator: one rounding to the output dtype instead of one per step (ldm.speed.fused_epilogues)."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a packed convolution is for inference: it has no backward (unpack_convolutions)")
        if not self.weight.is_mkldnn or self.packed_for != x.shape:
            self._pack(x.shape)
        bias = self.bias if bias is None else bias
        geometry = (self.padding, self.stride, self.dilation, self.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, bias, *geometry, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, self.weight, bias, *geometry, "add", 1.0, None, [], None
        )

    def _pack(self, input_size: torch.Size) -> None:
        if self.weight.is_mkldnn:  # packed for another size
            plain = self.weight.to_dense()
        else:
            plain = self.weight.detach()
            self.plain_channels_last = not plain.is_contiguous()  # NHWC, as ldm.generation.load lays out weights for it
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            plain, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(input_size)
        )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed_for = input_size
        release = getattr(self, "release_plain_weight", None)
        if release is not None:  # a view into a memory-mapped checkpoint: give its pages back
            release(plain)
        del plain
        trim_heap()

    def unpack(self) -> None:
        """Back to a plain `nn.Conv2d` with the same weight values."""
        if self.weight.is_mkldnn:
            plain = self.weight.to_dense()
            if self.plain_channels_last:
                plain = plain.contiguous(memory_format=torch.channels_last)
            self.weight = nn.Parameter(plain, requires_grad=False)
        self.__class__ = nn.Conv2d

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(), .float(), .to("meta")...: oneDNN tensors support none of them; act on the plain weight. To
        # "meta" (free_weights) the values are not needed: skip unpacking them (a reorder of every weight).
        w = self.weight
        if w.is_mkldnn and fn(torch.empty(0, dtype=w.dtype)).is_meta:
            self.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
        self.unpack()
        return nn.Conv2d._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        self.unpack()
        nn.Conv2d._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)
        self.__class__ = PackedConv2d  # packs again at the next call

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed for oneDNN"


def packable(module: nn.Module) -> bool:
    """A plain CPU inference Conv2d in a dtype oneDNN packs (float32, bfloat16)."""
    if type(module) is not nn.Conv2d or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return False
    w = module.weight
    if w.device.type != "cpu" or w.requires_grad or w.is_mkldnn:
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_convolutions(model: nn.Module, release: Callable[[torch.Tensor], object] | None = None) -> int:
    """Make every packable convolution of `model` pack its weight at its first call (one at a time, so the
    plain and packed copies of only one weight exist at once); returns how many. `release(plain)` is called
    with each plain weight once its packed copy replaces it."""
    if not _mkldnn_ops_available():
        return 0
    convs = [m for m in model.modules() if packable(m)]
    for conv in convs:
        conv.__class__ = PackedConv2d
        if release is not None:
            conv.release_plain_weight = release
    return len(convs)


def unpack_convolutions(model: nn.Module) -> int:
    """Undo `pack_convolutions`; returns how many were unpacked."""
    packed = [m for m in model.modules() if isinstance(m, PackedConv2d)]
    for conv in packed:
        conv.unpack()
    return len(packed)
