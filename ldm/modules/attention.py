"""Spatial transformer of the SD v1 UNet: self-attention, cross-attention to the text, gated feed-forward.

Attribute names follow the original module tree so checkpoint keys load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.speed.hooks import Merge, bipartite_merge, native


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # Outside autograd, into gelu's fresh (contiguous, as the product would be) output: the same values,
        # and one tensor of the feed-forward's width less (40 MB at 512 pixels with guidance).
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention; attends to `context` when given, else to `x` itself."""

    # Set by ldm.generation.load where ldm.speed.runtime.Runtime.native_attention says so: bf16 attention by
    # ldm.speed.native's kernel for the shapes it supports, PyTorch's for the rest.
    native_attention = False

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_out(self.attend(x, context))

    def attend(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' outputs side by side, before the output projection."""
        context = x if context is None else context
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        if self.native_attention and native.supports(q, k, v):
            out = native.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, -1)


def repeat_to_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` repeated to batch `n`: the UNet runs a guidance batch's identical halves as one until its first
    cross-attention, where the two contexts part them (UNetModel.shares_guidance_prefix)."""
    return x if x.shape[0] >= n else torch.cat([x] * (n // x.shape[0]))  # cat keeps channels-last


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, merge: Merge | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + (self.attn1(h) if merge is None else merge.unmerge(self.attn1(merge.merge(h))))
        x = x if context is None else repeat_to_batch(x, context.shape[0])
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image feature map -> token sequence -> transformer blocks -> feature map, added to the input."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels = in_channels
        # Set by ldm.speed.token_merge.merge_tokens: the share of tokens merged before each self-attention.
        self.token_merge_ratio = 0.0
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim)
            for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        y = self.transform(x, context)
        return repeat_to_batch(x, y.shape[0]) + self.proj_out(y)

    def transform(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer blocks' output as a feature map, before the output projection."""
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            merge = bipartite_merge(y, h, w, self.token_merge_ratio) if self.token_merge_ratio else None
            y = block(y, context=context, merge=merge)
        return y.transpose(1, 2).reshape(y.shape[0], -1, h, w)  # the batch may have grown (repeat_to_batch)
