"""The SD v1 denoising UNet: ResBlocks with timestep embedding, spatial transformers, skip connections.

Module attribute paths equal the original checkpoint keys (`input_blocks.1.0.in_layers.2.weight`, ...),
so a real `sd-v1-4.ckpt` loads without a rename table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer, repeat_to_batch
from ldm.speed.hooks import FeatureReuse, compute_dtype


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the original does for stability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.weight is not None and self.weight.dtype == torch.bfloat16:
            # bf16 has float32's range, and its kernels accumulate in float32 already: the same values up to
            # the output's last-bit rounding, without two full-tensor casts (3.5x to 12x faster on a bf16 CPU,
            # docs/performance.md).
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        # Weights in float32 too: with bf16/fp16 weights the CPU kernel refuses mixed dtypes.
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t*f), sin(t*f)] with geometric f."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights w = scale - 1 for LCM-distilled UNets: [sin(1000 w f), cos(1000 w f)]
    with f = 10000^(-i / (dim/2 - 1)), as diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1))).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedSequential(nn.Sequential):
    """Passes the timestep embedding to ResBlocks and the text context to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        out_size: torch.Size | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, or to `size` (the matching skip's) where an odd size was halved.

    The original always doubled, so latents whose size is not a multiple of 8 (images not a multiple
    of 64 pixels) crashed at the skip concatenation; for other sizes both give the same result.
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetModel(nn.Module):
    """Epsilon-predicting UNet conditioned on a timestep and a cross-attention context.

    Accepts the original config's parameters; those that only matter for training or for model
    variants SD v1 does not use (`use_checkpoint`, `legacy`, `image_size`) are accepted and ignored.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        dropout: float = 0.0,
        use_spatial_transformer: bool = True,
        image_size: int | None = None,
        use_checkpoint: bool = False,
        legacy: bool = False,
        conv_resample: bool = True,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        if not use_spatial_transformer or context_dim is None:
            raise ValueError(
                "only the text-conditioned UNet (use_spatial_transformer: True, context_dim set) is supported"
            )
        if not conv_resample:
            raise ValueError("conv_resample: False is not supported")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        self.model_channels = model_channels
        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # LCM-distilled UNets (time_cond_proj_dim, e.g. 256) take the guidance scale as an input: its embedding,
        # projected, is added to the timestep's. Key `time_embedding.cond_proj.weight`, diffusers' name, which its
        # diffusers-to-original converter keeps as is in single-file checkpoints.
        self.time_cond_proj_dim = time_cond_proj_dim
        if time_cond_proj_dim:
            cond_proj = nn.Linear(time_cond_proj_dim, model_channels, bias=False)
            self.time_embedding = nn.ModuleDict({"cond_proj": cond_proj})
        # The scale such a UNet embeds when a call gives none (set by ldm.generation.generate for LCM sampling);
        # None adds no guidance embedding, as diffusers' UNet without timestep_cond.
        self.guidance_scale: float | None = None

        def transformer(ch: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, depth=transformer_depth, context_dim=context_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_dim, dropout, out_channels=mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, dropout), transformer(ch), ResBlock(ch, time_dim, dropout)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, dropout, out_channels=model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        self.feature_reuse: FeatureReuse | None = None  # set by ldm.speed.feature_reuse.reuse_features
        # Run a guidance batch's two identical halves once up to the first cross-attention (`forward`); set by
        # ldm.generation.load where it pays and may change the last bits (Runtime.shares_guidance_prefix).
        self.shares_guidance_prefix = False

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        dtype = compute_dtype(self)
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if self.time_cond_proj_dim and scale is not None:
            w = torch.as_tensor(scale, dtype=torch.float32, device=x.device).expand(t_emb.shape[0]) - 1.0
            t_emb = t_emb + self.time_embedding.cond_proj(guidance_embedding(w, self.time_cond_proj_dim).to(dtype))
        emb = self.time_embed(t_emb)
        h = x.to(dtype)
        reuse = self.feature_reuse
        full = reuse is None or reuse.next_is_full(h)
        n = len(self.output_blocks)
        # A shallow call (feature reuse, see ldm.speed.feature_reuse) runs only the outer depth + 1 blocks of each half.
        outer = len(self.input_blocks) if full else reuse.depth + 1
        if self.shares_guidance_prefix and _identical_halves(h, timesteps):
            # Classifier-free guidance stacks the same latents twice, for two contexts. Until a cross-attention
            # meets the context the halves compute the same thing: run one (blocks take `emb` at the batch of
            # their input; BasicTransformerBlock repeats it at its cross-attention).
            h = h[: h.shape[0] // 2]
        skips = []
        for block in self.input_blocks[:outer]:
            h = block(h, emb[: h.shape[0]], context)
            skips.append(h)
        if full:
            h = self.middle_block(h, emb[: h.shape[0]], context)
        for i in range(n - len(skips), n):
            if reuse is not None and i == n - 1 - reuse.depth:  # where the kept deep feature enters
                if full:
                    reuse.cached = h
                else:
                    h = reuse.cached
            block = self.output_blocks[i]
            skip = skips.pop()
            h, skip = repeat_to_batch(h, skip.shape[0]), repeat_to_batch(skip, h.shape[0])
            h = torch.cat([h, skip], dim=1)
            h = block(h, emb[: h.shape[0]], context, out_size=skips[-1].shape[-2:] if skips else None)
        return self.out(repeat_to_batch(h, x.shape[0])).type(x.dtype)


def _identical_halves(x: torch.Tensor, timesteps: torch.Tensor) -> bool:
    n = x.shape[0]
    if n % 2 or n == 0:
        return False
    half = n // 2
    return torch.equal(timesteps[:half], timesteps[half:]) and torch.equal(x[:half], x[half:])

