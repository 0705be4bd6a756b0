"""Decode large latents in overlapping tiles, so the VAE's activations are a tile's, not the image's.

The decoder's GroupNorms and its mid-block attention see only their tile, so a tiled image is not
bit-equal to a whole one; tiles overlap by a quarter and are cross-faded with linear ramps, which hides
the seams. Opt-in (`--vae_tile`); the measured difference is in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours sharing `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, fade: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1 inside; rising over `fade` samples at an edge shared with a neighbouring tile."""
    w = torch.ones(length, dtype=torch.float32)
    if fade > 0:
        rise = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if at_start:
            w[:fade] = torch.minimum(w[:fade], rise)
        if at_end:
            w[-fade:] = torch.minimum(w[-fade:], rise.flip(0))
    return w


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int) -> torch.Tensor:
    """`decode` applied to latent tiles of `tile` x `tile` (overlap tile // 4), one sample at a time,
    blended into one float32 image. With `tile` at least the latent size it is `decode(z)` exactly."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decode(z)
    overlap = tile // 4
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: torch.Tensor | None = None
    for i in range(z.shape[0]):
        acc = weight = None
        for y in rows:
            for x in cols:
                th, tw = min(tile, h), min(tile, w)
                part = decode(z[i : i + 1, :, y : y + th, x : x + tw]).float()
                f = part.shape[-1] // tw  # pixels per latent
                if acc is None:
                    acc = part.new_zeros(1, part.shape[1], h * f, w * f)
                    weight = part.new_zeros(1, 1, h * f, w * f)
                wy = _ramp(th * f, overlap * f, y > 0, y + th < h).to(part.device)
                wx = _ramp(tw * f, overlap * f, x > 0, x + tw < w).to(part.device)
                m = wy[:, None] * wx[None, :]
                acc[..., y * f : (y + th) * f, x * f : (x + tw) * f] += part * m
                weight[..., y * f : (y + th) * f, x * f : (x + tw) * f] += m
                del part
        image = acc / weight
        if out is None:
            out = image.new_empty(z.shape[0], *image.shape[1:])
        out[i] = image[0]
    return out
