"""Token merging for the UNet's self-attention (ToMe for Stable Diffusion, Bolya & Hoffman, 2023).

At the UNet's full-resolution level, self-attention over every latent pixel is the costliest part of a step (a
third of it at 512x512 on a CPU, where its cost grows with the square of the token count). Before that attention,
a fraction of the tokens is averaged into the most similar token of a coarse grid (one per 2x2 cell); attention
runs on what is left, and each merged token takes its grid token's output. It changes the image (measured in
docs/performance.md), so it is opt-in (`--tome RATIO`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Merge:
    """One bipartite matching of [B, N, C] tokens: grid tokens (`dst`) and the others (`src`), of which the
    `src_idx` ones merge into the grid tokens `dst_idx` and the `keep_idx` ones stay."""

    n: int
    dst_pos: torch.Tensor  # [N_dst] token positions of the grid tokens
    src_pos: torch.Tensor  # [N_src] token positions of the others
    keep_idx: torch.Tensor  # [B, N_src - r] into src
    src_idx: torch.Tensor  # [B, r] into src
    dst_idx: torch.Tensor  # [B, r] into dst

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: the kept tokens, then the grid tokens averaged with those merged in."""
        c = x.shape[-1]
        src, dst = x[:, self.src_pos], x[:, self.dst_pos]
        kept = src.gather(1, _expand(self.keep_idx, c))
        merged = src.gather(1, _expand(self.src_idx, c))
        dst = dst.scatter_reduce(1, _expand(self.dst_idx, c), merged, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: every token at its place, a merged one with its grid token's value."""
        b, _, c = y.shape
        n_keep = self.keep_idx.shape[1]
        kept, dst = y[:, :n_keep], y[:, n_keep:]
        src = y.new_empty(b, self.src_pos.numel(), c)
        src.scatter_(1, _expand(self.keep_idx, c), kept)
        src.scatter_(1, _expand(self.src_idx, c), dst.gather(1, _expand(self.dst_idx, c)))
        out = y.new_empty(b, self.n, c)
        out[:, self.dst_pos] = dst
        out[:, self.src_pos] = src
        return out


def _expand(index: torch.Tensor, c: int) -> torch.Tensor:
    return index[..., None].expand(-1, -1, c)


def grid_positions(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, other) token positions of an h x w map, row-major; the grid is every even row's even columns."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    on_grid = ((ys % 2 == 0) & (xs % 2 == 0)).flatten()
    return on_grid.nonzero().flatten(), (~on_grid).nonzero().flatten()


def bipartite_merge(x: torch.Tensor, h: int, w: int, ratio: float) -> Merge | None:
    """Match `ratio` of the N = h*w tokens of x ([B, N, C]) to grid tokens by cosine similarity, most similar
    first (at most every non-grid token); None when nothing would merge."""
    b, n, _ = x.shape
    if n != h * w:
        raise ValueError(f"{n} tokens are not an {h}x{w} map")
    dst_pos, src_pos = grid_positions(h, w, x.device)
    r = min(int(n * ratio), src_pos.numel())
    if r <= 0:
        return None
    metric = x / x.norm(dim=-1, keepdim=True)
    scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src_idx, keep_idx = order[:, :r], order[:, r:]
    return Merge(n, dst_pos, src_pos, keep_idx, src_idx, best_dst.gather(1, src_idx))


@contextlib.contextmanager
def merge_tokens(model, ratio: float) -> Iterator[None]:
    """Within the block, `model`'s UNet merges `ratio` of the tokens before each self-attention of its
    full-resolution level (ToMe's default there: attention only; 0 does nothing)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"token merging ratio must be in [0, 1), not {ratio}")
    if ratio == 0.0:
        yield
        return
    unet = model.model.diffusion_model
    # The spatial transformers (the modules with this switch) of the full-resolution level.
    outer = [m for m in unet.modules() if hasattr(m, "token_merge_ratio") and m.in_channels == unet.model_channels]
    for m in outer:
        m.token_merge_ratio = ratio
    try:
        yield
    finally:
        for m in outer:
            m.token_merge_ratio = 0.0
